"""Llama-family forward over a slot KV cache, for the native engine.

The math is Hugging Face's `LlamaForCausalLM` (RMSNorm, RoPE with the config's rope_theta and
static rope scaling, grouped-query attention, SwiGLU MLP, optionally tied LM head), with the
two deltas of the other common families: Qwen2 (`Qwen2ForCausalLM`: biases on q/k/v) and
Qwen3 (`Qwen3ForCausalLM`: RMSNorm over each head's q and k before RoPE, `q_norm`/`k_norm`;
biases when `attention_bias`). Llama's own `attention_bias` / `mlp_bias` are honoured too.
Written so that the engine owns the cache:

- Weights are fused and stacked per kind: `qkv[l] = cat(q_proj, k_proj, v_proj)`,
  `gate_up[l] = cat(gate_proj, up_proj)`, so a layer is 4 matmuls instead of 7. `params` maps
  the HF state-dict names of plain weights to views into these tensors; loading and
  `update_weights` copy into the views, so nothing is reallocated.
- bf16 on CPU: the matmul weights are held only in oneDNN's prepacked layout (the one
  inductor's CPU freezing uses), packed again for the entries an update touches, straight
  from the pushed tensors (no plain copy kept: less memory, one pass less). Measured on this 2-core
  Xeon (1 thread, [3072, 576] weights): 553 us vs 1156 us for `F.linear` at 64 rows, 459 vs
  888 at 4 rows (the small-batch tail of a rollout is weight-bandwidth bound, and the
  unpacked bf16 path reorders the weight on every call); outputs identical at batch <= 64.
- The KV cache is one preallocated tensor `kv[layer, k|v, slot, kv_head, position, head_dim]`.
  A sequence owns a slot; slots `0..B-1` are the running batch (the engine keeps them
  compacted), so decode attention reads `kv[l, :, :B, :, :len]` as a strided view, no gather.

Shapes in comments: T packed prefill tokens, B running rows, H hidden, D head_dim.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# RoPE types whose inverse frequencies do not depend on the sequence length.
_STATIC_ROPE = {"default", "linear", "llama3", "yarn"}
# HF `model_type`s the forward implements (each config class names its biases differently).
ARCHITECTURES = ("llama", "qwen2", "qwen3")
# Batch-size hint for oneDNN weight prepacking: 64 rows was fastest of 1/8/64/256 at 4-64 rows
# and bit-identical to F.linear there (hint 1 differed by 1e-3 relative at 64 rows).
_PACK_M = 64


def _can_pack() -> bool:
    """oneDNN bf16 prepacked linear is available (x86 CPU build with mkldnn)."""
    try:
        w = torch.zeros(8, 8, dtype=torch.bfloat16)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, _PACK_M)
        torch.ops.mkldnn._linear_pointwise(w, packed, None, "none", [], "")
        return bool(torch.backends.mkldnn.is_available())
    except (RuntimeError, AttributeError):
        return False


def _back_to_back(ts: list[torch.Tensor]) -> bool:
    """The row-major 2-D tensors `ts` (same columns and dtype) follow each other in one
    buffer, so that one [sum of rows, cols] view covers them."""
    if not all(t.is_contiguous() and t.dim() == 2 for t in ts):
        return False
    ptr = ts[0].data_ptr()
    storage = ts[0].untyped_storage().data_ptr()
    for t in ts:
        if t.data_ptr() != ptr or t.untyped_storage().data_ptr() != storage:
            return False
        if t.shape[1] != ts[0].shape[1] or t.dtype != ts[0].dtype:
            return False
        ptr += t.numel() * t.element_size()
    return True


@dataclass(frozen=True)
class LlamaSpec:
    """The architecture numbers the forward needs, read from an HF `LlamaConfig`."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    eps: float
    max_positions: int
    tied: bool
    inv_freq: tuple[float, ...]  # RoPE inverse frequencies, [D/2]
    rope_scale: float  # "attention_scaling" of yarn/longrope; 1.0 otherwise
    qkv_bias: bool = False  # q/k/v projections have biases (Qwen2; attention_bias)
    o_bias: bool = False  # o_proj has a bias (Llama/Qwen3 attention_bias)
    mlp_bias: bool = False  # gate/up/down have biases (Llama mlp_bias)
    qk_norm: bool = False  # RMSNorm of each head's q and k before RoPE (Qwen3)

    @classmethod
    def from_hf_config(cls, config) -> LlamaSpec:
        """The spec of an HF config; NotImplementedError (naming what) for anything the
        forward does not implement: another architecture, sliding-window layers, a
        length-dependent RoPE, an activation other than SiLU."""
        arch = getattr(config, "model_type", "llama")
        if arch not in ARCHITECTURES:
            raise NotImplementedError(
                f"the native engine implements {', '.join(ARCHITECTURES)}, not {arch!r}"
            )
        windowed = [t for t in getattr(config, "layer_types", None) or () if t != "full_attention"]
        if windowed:  # HF lists every layer's kind (sliding only where it applies)
            raise NotImplementedError("the native engine has no sliding-window attention")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise NotImplementedError(f"native engine: hidden_act {config.hidden_act}")
        attn_bias = bool(getattr(config, "attention_bias", False))
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // (
            config.num_attention_heads
        )
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
        rope = dict(rope or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in _STATIC_ROPE:
            raise NotImplementedError(f"native engine: rope_type {rope_type!r} (length-dependent)")
        if rope_type == "default":
            theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
            inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
            scale = 1.0
        else:  # the HF init functions are the reference for the scaled variants
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            inv, scale = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
        return cls(
            vocab=config.vocab_size,
            hidden=config.hidden_size,
            layers=config.num_hidden_layers,
            heads=config.num_attention_heads,
            kv_heads=config.num_key_value_heads or config.num_attention_heads,
            head_dim=head_dim,
            intermediate=config.intermediate_size,
            eps=float(config.rms_norm_eps),
            max_positions=config.max_position_embeddings,
            tied=bool(getattr(config, "tie_word_embeddings", False)),
            inv_freq=tuple(float(x) for x in inv),
            rope_scale=float(scale),
            qkv_bias=arch == "qwen2" or attn_bias,
            o_bias=arch != "qwen2" and attn_bias,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            qk_norm=arch == "qwen3",
        )

    @property
    def num_params(self) -> int:
        h, i, d = self.hidden, self.intermediate, self.head_dim
        qkv = (self.heads + 2 * self.kv_heads) * d
        attn = h * qkv + self.heads * d * h
        attn += qkv * self.qkv_bias + h * self.o_bias + 2 * d * self.qk_norm
        per_layer = attn + 3 * h * i + (2 * i + h) * self.mlp_bias + 2 * h
        head = 0 if self.tied else self.vocab * h
        return self.vocab * h + self.layers * per_layer + h + head


@dataclass
class PrefillPlan:
    """Index tensors for one batched prefill of P sequences packed into T tokens."""

    ids: torch.Tensor  # [T] token ids, sequences back to back (grouped, see `groups`)
    pos: torch.Tensor  # [T] position of each token in its sequence
    last: torch.Tensor  # [P] packed index of each sequence's last token
    write_rows: torch.Tensor  # [N] cache slot of each (token, sample) write, N = sum(len * n)
    write_pos: torch.Tensor  # [N] cache position of that write
    write_src: torch.Tensor  # [N] packed token it copies
    # Attention groups: (start, end, count, pad_len, pad_index or None). Tokens [start, end) are
    # `count` sequences; pad_index [end-start] scatters them into a [count * pad_len] buffer,
    # None when all have length pad_len (then a view suffices).
    groups: list[tuple[int, int, int, int, torch.Tensor | None]]


def plan_prefill(seqs: list[list[int]], rows: list[list[int]], device: torch.device) -> PrefillPlan:
    """Pack `seqs` for one prefill pass; sequence i's KV goes to every slot in `rows[i]`.

    Attention runs on padded groups of similar length (`kernels.attention.length_groups`:
    sorted by length, a group's padded size <= 1.5x its real tokens), so one long prompt does
    not make 63 short ones pay for its length (padded causal attention is O(count * pad_len^2)).
    """
    from rlsys.kernels.attention import length_groups

    ids: list[int] = []
    pos: list[int] = []
    last = [0] * len(seqs)
    w_rows: list[int] = []
    w_pos: list[int] = []
    w_src: list[int] = []
    groups: list[tuple[int, int, int, int, torch.Tensor | None]] = []
    for members in length_groups([len(x) for x in seqs]):
        group_start = len(ids)
        for i in members:
            n = len(seqs[i])
            start = len(ids)
            ids.extend(seqs[i])
            pos.extend(range(n))
            last[i] = start + n - 1
            for r in rows[i]:
                w_rows.extend([r] * n)
                w_pos.extend(range(n))
                w_src.extend(range(start, start + n))
        lens = [len(seqs[i]) for i in members]
        pad_len, count = lens[0], len(lens)
        index = None
        if any(n != pad_len for n in lens):
            index = torch.tensor(
                [k * pad_len + t for k, n in enumerate(lens) for t in range(n)], device=device
            )
        groups.append((group_start, len(ids), count, pad_len, index))

    def t(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.long, device=device)

    return PrefillPlan(t(ids), t(pos), t(last), t(w_rows), t(w_pos), t(w_src), groups)


class LlamaModel:
    """Llama weights (fused, in place) and the prefill/decode forward over a slot cache."""

    def __init__(self, spec: LlamaSpec, dtype: torch.dtype, device: torch.device) -> None:
        s = spec
        self.spec, self.dtype, self.device = s, dtype, device
        h, d, i = s.hidden, s.head_dim, s.intermediate
        self.q_dim, self.kv_dim = s.heads * d, s.kv_heads * d

        def empty(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        # bf16 on an x86 CPU: the matmul weights live only in oneDNN's packed layout (no
        # plain copy: -0.21 GB for the default model, and an update packs straight from the
        # pushed tensors). Otherwise plain fused tensors that `F.linear` reads.
        self._packed: dict[str, list] | None = None
        if dtype == torch.bfloat16 and device.type == "cpu" and _can_pack():
            self._packed = {k: [None] * s.layers for k in ("qkv", "o", "gate_up", "down")}
            self._packed["lm_head"] = [None]
        plain = self._packed is None
        # Each fused matmul weight: its HF parts (name, rows) in order, and its columns.
        q, kv = self.q_dim, self.kv_dim
        parts = {
            "qkv": (("self_attn.q_proj", q), ("self_attn.k_proj", kv), ("self_attn.v_proj", kv)),
            "o": (("self_attn.o_proj", h),),
            "gate_up": (("mlp.gate_proj", i), ("mlp.up_proj", i)),
            "down": (("mlp.down_proj", h),),
        }
        cols = {"qkv": h, "o": q, "gate_up": h, "down": i}
        self.embed = empty(s.vocab, h)
        for kind, names in parts.items():
            rows = sum(n for _, n in names)
            setattr(self, kind, empty(s.layers, rows, cols[kind]) if plain else None)
        # Biases of the fused matmuls that have them: [layers, rows], plain (never packed).
        with_bias = {"qkv": s.qkv_bias, "o": s.o_bias, "gate_up": s.mlp_bias, "down": s.mlp_bias}
        self.bias = {
            kind: empty(s.layers, sum(n for _, n in parts[kind]))
            for kind, on in with_bias.items()
            if on
        }
        self.ln_attn = empty(s.layers, h)
        self.ln_mlp = empty(s.layers, h)
        # Qwen3: one [D] RMSNorm weight for every q head and one for every k head, per layer.
        self.q_norm = empty(s.layers, d) if s.qk_norm else None
        self.k_norm = empty(s.layers, d) if s.qk_norm else None
        self.norm = empty(h)
        self.lm_head = self.embed if s.tied else (empty(s.vocab, h) if plain else None)

        # HF name -> shape; -> view into a plain tensor (the copy target of load/update); or
        # -> (kind, layer, first row, last row) of the fused matmul weight it is part of.
        head = "model.embed_tokens.weight" if s.tied else "lm_head.weight"
        self.shapes: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (s.vocab, h),
            "model.norm.weight": (h,),
            head: (s.vocab, h),
        }
        self.params: dict[str, torch.Tensor] = {
            "model.embed_tokens.weight": self.embed,
            "model.norm.weight": self.norm,
        }
        self._rows: dict[str, tuple[str, int, int, int]] = {head: ("lm_head", 0, 0, s.vocab)}
        if plain and not s.tied:
            self.params[head] = self.lm_head
        for layer in range(s.layers):
            pre = f"model.layers.{layer}."
            for kind, names in parts.items():
                r0 = 0
                for name, n in names:
                    key = f"{pre}{name}.weight"
                    self.shapes[key] = (n, cols[kind])
                    self._rows[key] = (kind, layer, r0, r0 + n)
                    if plain:
                        self.params[key] = getattr(self, kind)[layer, r0 : r0 + n]
                    if kind in self.bias:
                        self.shapes[f"{pre}{name}.bias"] = (n,)
                        self.params[f"{pre}{name}.bias"] = self.bias[kind][layer, r0 : r0 + n]
                    r0 += n
            norms = [("input_layernorm", self.ln_attn), ("post_attention_layernorm", self.ln_mlp)]
            if self.q_norm is not None and self.k_norm is not None:
                norms += [("self_attn.q_norm", self.q_norm), ("self_attn.k_norm", self.k_norm)]
            for name, w in norms:
                self.shapes[f"{pre}{name}.weight"] = tuple(w.shape[1:])
                self.params[f"{pre}{name}.weight"] = w[layer]
        self._parts = {kind: [n for n, _ in names] for kind, names in parts.items()}

        # RoPE tables as HF builds them: fp32 angles, cos/sin cast to the model dtype.
        inv = torch.tensor(s.inv_freq, dtype=torch.float32)
        ang = torch.arange(s.max_positions, dtype=torch.float32)[:, None] * inv[None, :]
        emb = torch.cat([ang, ang], dim=-1)  # [max_positions, D]
        self.cos = (emb.cos() * s.rope_scale).to(dtype=dtype, device=device)
        self.sin = (emb.sin() * s.rope_scale).to(dtype=dtype, device=device)

    # ---- weights -------------------------------------------------------------------------

    def check_weights(
        self, named: Mapping[str, torch.Tensor], require_all: bool, finite: bool = True
    ) -> None:
        """Raise ValueError listing unknown, missing and mis-shaped tensors, and (`finite`)
        non-finite ones (changes nothing)."""
        expected = dict(self.shapes)
        if self.spec.tied:
            expected["lm_head.weight"] = self.shapes["model.embed_tokens.weight"]
        unknown = [k for k in named if k not in expected]
        bad = [
            f"{k}: got {type(t).__name__}, expected a tensor"
            for k, t in named.items()
            if k in expected and not isinstance(t, torch.Tensor)
        ]
        bad += [
            f"{k}: got {tuple(t.shape)}, expected {expected[k]}"
            for k, t in named.items()
            if k in expected and isinstance(t, torch.Tensor) and tuple(t.shape) != expected[k]
        ]
        missing = [k for k in self.shapes if k not in named] if require_all else []
        if unknown or missing or bad:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)}: {missing[:5]}")
            if unknown:
                parts.append(f"unknown {len(unknown)}: {unknown[:5]}")
            if bad:
                parts.append(f"mis-shaped {len(bad)}: {bad[:5]}")
            raise ValueError("weight update rejected, nothing changed; " + "; ".join(parts))
        # A NaN/inf weight would poison every later sample; one pass over 135M values is
        # ~0.1 s, small next to the push itself.
        if not finite:  # the sender checked (SharedWeights.write)
            return
        nonfinite = [
            k for k, t in named.items() if t.is_floating_point() and not bool(t.isfinite().all())
        ]
        if nonfinite:
            raise ValueError(f"weight update rejected: non-finite values in {nonfinite[:5]}")

    @torch.inference_mode()
    def load(
        self, named: Mapping[str, torch.Tensor], require_all: bool = True, finite: bool = True
    ) -> None:
        """Validate everything first, then copy each tensor into place (casts dtype and
        device); a tied model's `lm_head.weight` is ignored (it is the embedding). `finite=False`
        skips the NaN/inf scan (the sender did it).

        Packed weights: each fused matmul weight an update touches is packed again, straight
        from the given tensors when they are its parts laid out back to back in one buffer
        (a shared-memory push), else from their concatenation; parts an update leaves out
        are read back from the current packed weight."""
        self.check_weights(named, require_all, finite)
        for k, t in named.items():
            if k in self.params:
                self.params[k].copy_(t)
        if self._packed is None:
            return
        touched = {self._rows[k][:2] for k in named if k in self._rows}
        for kind, layer in sorted(touched):
            self._packed[kind][layer] = torch.ops.mkldnn._reorder_linear_weight(
                self._fused_source(named, kind, layer), _PACK_M
            )

    def _fused_source(
        self, named: Mapping[str, torch.Tensor], kind: str, layer: int
    ) -> torch.Tensor:
        """The plain [rows, cols] weight to pack for (kind, layer) after an update `named`."""
        if kind == "lm_head":
            return self.embed if self.spec.tied else named["lm_head.weight"].to(self.dtype)
        keys = [f"model.layers.{layer}.{n}.weight" for n in self._parts[kind]]
        given = [named.get(k) for k in keys]
        if all(t is not None for t in given):
            ts = [t.to(self.device, self.dtype) for t in given]  # type: ignore[union-attr]
            if len(ts) == 1:
                return ts[0]
            if _back_to_back(ts):
                rows = sum(t.shape[0] for t in ts)
                return ts[0].as_strided((rows, ts[0].shape[1]), (ts[0].shape[1], 1))
            return torch.cat(ts)
        w = self._packed[kind][layer].to_dense().clone()  # type: ignore[index]
        for k, t in zip(keys, given, strict=True):
            if t is not None:
                _, _, r0, r1 = self._rows[k]
                w[r0:r1].copy_(t)
        return w

    def weight(self, name: str) -> torch.Tensor:
        """A copy of the loaded weight `name` (HF name), from the packed layout if need be."""
        if name in self.params:
            return self.params[name].detach().clone()
        if self.spec.tied and name == "lm_head.weight":
            return self.embed.clone()
        kind, layer, r0, r1 = self._rows[name]
        assert self._packed is not None
        return self._packed[kind][layer].to_dense()[r0:r1].clone()

    def _linear(self, x: torch.Tensor, kind: str, layer: int = 0) -> torch.Tensor:
        b = self.bias[kind][layer] if kind in self.bias else None
        if self._packed is not None:
            w = self._packed[kind][layer]
            return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        return F.linear(x, self.lm_head if kind == "lm_head" else getattr(self, kind)[layer], b)

    # ---- forward -------------------------------------------------------------------------

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # HF order: normalize in fp32, cast back, then scale (so bf16 rounds where HF does).
        return w * F.rms_norm(x.float(), (x.shape[-1],), eps=self.spec.eps).to(x.dtype)

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x [N, heads, D], cos/sin [N, 1, D]; rotate_half as in HF.
        half = x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rot * sin

    def _qkv(self, x: torch.Tensor, layer: int, cos: torch.Tensor, sin: torch.Tensor):
        s = self.spec
        qkv = self._linear(self._rms(x, self.ln_attn[layer]), "qkv", layer)
        n = qkv.shape[0]
        qk = qkv[:, : self.q_dim + self.kv_dim].view(n, -1, s.head_dim)
        if self.q_norm is not None and self.k_norm is not None:  # Qwen3: per-head RMSNorm
            w = torch.cat(
                [self.q_norm[layer].expand(s.heads, -1), self.k_norm[layer].expand(s.kv_heads, -1)]
            )
            qk = self._rms(qk, w)
        # RoPE once on q and k together (one set of elementwise ops instead of two).
        qk = self._rope(qk, cos, sin)
        q, k = qk[:, : s.heads], qk[:, s.heads :]
        v = qkv[:, self.q_dim + self.kv_dim :].view(n, s.kv_heads, s.head_dim)
        return q, k, v

    def _mlp_residual(self, x: torch.Tensor, attn: torch.Tensor, layer: int) -> torch.Tensor:
        x = x + self._linear(attn, "o", layer)
        gu = self._linear(self._rms(x, self.ln_mlp[layer]), "gate_up", layer)
        g, u = gu.split(self.spec.intermediate, dim=-1)
        return x + self._linear(F.silu(g) * u, "down", layer)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(self._rms(x, self.norm), "lm_head").float()

    def new_cache(self, slots: int, max_len: int) -> torch.Tensor:
        s = self.spec
        shape = (s.layers, 2, slots, s.kv_heads, max_len, s.head_dim)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    @torch.inference_mode()
    def prefill(self, plan: PrefillPlan, kv: torch.Tensor) -> torch.Tensor:
        """Run the packed prompts, write their K/V to every target slot, return the fp32
        logits of each sequence's last token, [P, V]."""
        s = self.spec
        x = F.embedding(plan.ids, self.embed)  # [T, H]
        cos, sin = self.cos[plan.pos].unsqueeze(1), self.sin[plan.pos].unsqueeze(1)
        t = x.shape[0]
        for layer in range(s.layers):
            q, k, v = self._qkv(x, layer, cos, sin)  # [T, heads|kv_heads, D]
            # One index_put per layer writes the prompt's K/V into all n sample slots: the
            # prefix is computed once per group and copied, not recomputed n times.
            kv[layer, :, plan.write_rows, :, plan.write_pos] = torch.stack([k, v], dim=1)[
                plan.write_src
            ]
            out = torch.empty((t, s.heads, s.head_dim), dtype=x.dtype, device=x.device)
            for start, end, count, pad_len, index in plan.groups:
                out[start:end] = self._group_attention(
                    q[start:end], k[start:end], v[start:end], count, pad_len, index
                )
            x = self._mlp_residual(x, out.view(t, self.q_dim), layer)
        return self._logits(x[plan.last])

    def _group_attention(self, q, k, v, count: int, pad_len: int, index) -> torch.Tensor:
        def pad(z: torch.Tensor) -> torch.Tensor:  # [n, h, D] -> [count, h, pad_len, D]
            if index is not None:
                buf = z.new_zeros((count * pad_len, z.shape[1], z.shape[2]))
                buf[index] = z
                z = buf
            return z.view(count, pad_len, z.shape[1], z.shape[2]).transpose(1, 2)

        # Right padding + causal mask: real queries never see the padded keys after them.
        o = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), is_causal=True, enable_gqa=True)
        o = o.transpose(1, 2).reshape(count * pad_len, q.shape[1], q.shape[2])
        return o if index is None else o[index]

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, pos: torch.Tensor, kv_len: int, kv: torch.Tensor):
        """One token for each of the B running rows (slots 0..B-1): `tokens[b]` sits at
        position `pos[b]`; `kv_len = max(pos) + 1`. Returns fp32 logits [B, V]."""
        s = self.spec
        b = tokens.shape[0]
        rows = torch.arange(b, device=tokens.device)
        x = F.embedding(tokens, self.embed)  # [B, H]
        cos, sin = self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1)
        # Rows are at different lengths: mask keys past each row's own position.
        keys = torch.arange(kv_len, device=tokens.device)
        mask = (keys[None, :] <= pos[:, None]).view(b, 1, 1, kv_len)
        group = s.heads // s.kv_heads
        for layer in range(s.layers):
            q, k, v = self._qkv(x, layer, cos, sin)
            kv[layer, :, rows, :, pos] = torch.stack([k, v], dim=1)  # [B, 2, kv_heads, D]
            cache = kv[layer, :, :b, :, :kv_len]  # [2, B, kv_heads, L, D], a view
            # GQA without repeating K/V: the `group` query heads that share a kv head are
            # the "query positions" of one attention call against that head. SDPA's CPU flash
            # kernel on the strided cache view beat matmul + softmax (bf16, 1 thread, CPU us):
            # 261 vs 596 at 8 rows x 300 keys, 541 vs 881 at 64 x 64; copying K/V contiguous
            # first cost 2.8x; 9 query heads with enable_gqa was no faster.
            o = F.scaled_dot_product_attention(
                q.reshape(b, s.kv_heads, group, s.head_dim), cache[0], cache[1], attn_mask=mask
            )
            x = self._mlp_residual(x, o.reshape(b, self.q_dim), layer)
        return self._logits(x)
