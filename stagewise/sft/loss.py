"""Next-token loss at learnt positions only, in chunks, so that the (tokens x vocab) fp32 logits of a
batch never exist.

    batch = collate(rows, pad_id=tok.pad_token_id, device=dev)   # packed rows -> tensors
    nll = SFTLoss(lm)(**batch)                                    # (N,) fp32, one per learnt token

Shapes: B rows of T tokens; N learnt positions in the batch (targets != IGNORE); H hidden; V vocab.
The transformer body runs on the whole (B, T) batch; the head and the log-softmax run on N rows
only, ``chunk`` at a time (``lm_head.token_logprobs``), each chunk, when there are several, under
activation checkpointing (its logits are recomputed in backward instead of kept): peak extra memory
is one (chunk, V) fp32 block. Packed rows need no
attention mask: positions restart at 0 for every example and transformers then builds a
block-diagonal causal mask (dense under the default sdpa kernel; a variable-length kernel with
``model.attn_implementation: flash_attention_2``).

Rows of one example each (``collate(..., shared_prefix=True)``: agent episodes that open with the
same few-thousand-token system prompt) run their micro-batch's common opening once, with gradients,
and every row's rest against its KV cache (``prefix_sharing``): the same values and gradients for
a fraction of the token forwards.
"""

from __future__ import annotations

import torch

from stagewise.generation.padding import right_pad
from stagewise.lm_head import token_logprobs
from stagewise.prefix_sharing import shared_prefix_hidden, use_prefix_tree
from stagewise.sft.data import IGNORE, PackedRow


def collate(rows: list[PackedRow], pad_id: int, device=None, shared_prefix: bool = False) -> dict[str, torch.Tensor]:
    """-> input_ids, position_ids (B, T); target_index (N,) flat indices into B*T; targets (N,); and
    with ``shared_prefix`` (rows of one example each) lengths (B,): SFTLoss then runs the rows'
    common opening once. Rows are right-padded to the longest; padding is its own "example"
    (positions restart), learns nothing."""
    ids, _ = right_pad([r.ids for r in rows], pad_id, "cpu")
    tgt, _ = right_pad([r.targets for r in rows], IGNORE, "cpu")
    T = ids.size(1)
    pos = torch.stack([torch.cat([torch.as_tensor(r.positions, dtype=torch.long), torch.arange(T - len(r))])
                       for r in rows])
    flat = tgt.view(-1)
    index = (flat != IGNORE).nonzero().squeeze(1)
    out = {"input_ids": ids, "position_ids": pos, "target_index": index, "targets": flat[index]}
    if shared_prefix:
        if not all(r.single for r in rows):
            raise ValueError("shared_prefix needs rows of one example each (packed rows restart their positions)")
        out["lengths"] = torch.tensor([len(r) for r in rows])
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


def chunked_nll(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, chunk: int = 1024,
                softcap: float | None = None) -> torch.Tensor:
    """hidden (N, H), targets (N,) -> (N,) fp32 NLL, the head applied ``chunk`` rows at a time
    (lm_head.token_logprobs)."""
    if hidden.size(0) == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    return -token_logprobs(hidden, targets, head, softcap=softcap, chunk=chunk)[0]


class SFTLoss(torch.nn.Module):
    """The causal LM wrapped so that one forward returns the NLL of every learnt token. This is the
    module handed to the strategy (DDP / DeepSpeed / FSDP): they see one forward per micro-batch.
    The HF model is ``.lm`` (exported as it is)."""

    def __init__(self, lm, chunk: int = 1024):
        super().__init__()
        self.lm, self.chunk = lm, chunk
        self.tree = use_prefix_tree(lm)  # False: the model's attention cannot be the tree's (plain forward)

    def forward(self, input_ids, position_ids, target_index, targets, lengths=None) -> torch.Tensor:
        hf = self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm  # peft wraps it
        body = getattr(hf, hf.base_model_prefix)
        if lengths is not None and self.tree:  # one example per row: their common opening once (prefix_sharing)
            picked = shared_prefix_hidden(body, input_ids, lengths, target_index)
        else:
            hidden = body(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
            picked = hidden.reshape(-1, hidden.size(-1)).index_select(0, target_index)
        softcap = getattr(hf.config, "final_logit_softcapping", None)
        return chunked_nll(picked, hf.get_output_embeddings(), targets, self.chunk, softcap)
