"""A simple batched generator on `transformers.generate` (the Foundation engine).

Prompts are left-padded into one batch, each repeated `n` times; sampling is seeded per call.
Logprobs are those of the sampled tokens under `log_softmax(logits / temperature)` of the raw
(unwarped) logits, which is what the trainer recomputes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Generation:
    tokens: list[int]
    logprobs: list[float]
    finished: bool  # ended on a stop token (else hit max_new_tokens)


class HFGenerator:
    def __init__(self, model, eos_ids: list[int], pad_id: int) -> None:
        self.model = model
        self.eos_ids = set(eos_ids)
        self.pad_id = pad_id

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        n: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
        greedy: bool = False,
    ) -> list[list[Generation]]:
        """`n` sampled (or greedy) continuations for each prompt, grouped per prompt."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        torch.manual_seed(seed)
        out = self.model.generate(
            input_ids=ids.to(self.model.device),
            attention_mask=mask.to(self.model.device),
            do_sample=not greedy,
            temperature=None if greedy else temperature,
            top_p=None if greedy else top_p,
            top_k=None if greedy else 0,
            max_new_tokens=max_new_tokens,
            num_return_sequences=n,
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.pad_id,
            return_dict_in_generate=True,
            output_logits=True,
        )
        new = out.sequences[:, width:]  # [B*n, T]
        logits = torch.stack(out.logits, dim=1).float()  # [B*n, T, V], raw
        lp = torch.log_softmax(logits / temperature, dim=-1)
        lp = lp.gather(-1, new.unsqueeze(-1)).squeeze(-1)  # [B*n, T]
        groups: list[list[Generation]] = []
        for i in range(len(prompts)):
            group = []
            for j in range(n):
                row = i * n + j
                toks = new[row].tolist()
                end, finished = len(toks), False
                for t, tok in enumerate(toks):
                    if tok in self.eos_ids:
                        end, finished = t + 1, True
                        break
                group.append(Generation(toks[:end], lp[row, :end].tolist(), finished))
            groups.append(group)
        return groups
