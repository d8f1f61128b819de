"""Log-probabilities (and entropies) of completion tokens only: the transformer body on the whole
micro-batch, the vocabulary head and log-softmax on the completion tokens in chunks, so that the
(tokens x vocab) logits of a micro-batch never exist (SFT's loss does the same: sft/loss.py)."""

from __future__ import annotations

import torch

from stagewise.generation.padding import position_ids_from_mask
from stagewise.lm_head import token_logprobs
from stagewise.prefix_sharing import shared_prefix_hidden, unpadded, use_prefix_tree


def selective_logprobs(logits: torch.Tensor, ids: torch.Tensor, chunk: int = 4) -> torch.Tensor:
    """log softmax(logits)[ids], computed `chunk` rows at a time in fp32.

    logits: (B, T, V) any float dtype; ids: (B, T) -> (B, T) fp32. Peak extra memory is one
    (chunk, T, V) fp32 block instead of (B, T, V).
    """
    out = []
    for i in range(0, logits.size(0), chunk):
        lg = logits[i:i + chunk].float()
        out.append(lg.gather(-1, ids[i:i + chunk, :, None]).squeeze(-1) - torch.logsumexp(lg, dim=-1))
    return torch.cat(out, dim=0)


@torch.no_grad()
def entropy_from_logits(logits: torch.Tensor, chunk: int = 4) -> torch.Tensor:
    """(B, T, V) -> (B, T) entropy in nats, chunked, no grad (a cheap diagnostic)."""
    out = []
    for i in range(0, logits.size(0), chunk):
        lg = logits[i:i + chunk].float()
        logz = torch.logsumexp(lg, dim=-1, keepdim=True)
        p = torch.exp(lg - logz)
        out.append((logz.squeeze(-1) - (p * lg).sum(-1)))
    return torch.cat(out, dim=0)


def _body_and_head(lm):
    """The transformer body (hidden states out) and the output head of an HF causal LM (peft unwrapped)."""
    hf = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    return hf, getattr(hf, hf.base_model_prefix), hf.get_output_embeddings()


def completion_hidden(body, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                      completion_mask: torch.Tensor, share_prefix: bool = False) -> torch.Tensor:
    """Hidden states at the positions that predict each real completion token: (N, H), N =
    completion_mask.sum(), in the order of ``completion_mask.nonzero()``.

    prompt_*: (B, P) left-padded; completion_*: (B, C) right-padded. Only the body runs here (no
    vocabulary projection: ``token_logprobs`` applies the head in chunks).

    share_prefix: the rows run packed as a prefix tree (``prefix_sharing``): what they share (a GRPO
    group's prompt, a domain's system prompt) once, every row's tail attending to it; equal to the
    plain forward, values and gradients, while a shared prefix costs one row instead of each.
    """
    if share_prefix:  # the body's attention is the tree attention (PolicyLogprobs switched it)
        ids, lengths, index = unpadded(prompt_ids, prompt_mask, completion_ids, completion_mask)
        return shared_prefix_hidden(body, ids, lengths, index)
    B, C = completion_ids.shape
    ids = torch.cat([prompt_ids, completion_ids[:, :-1]], dim=1)
    mask = torch.cat([prompt_mask, completion_mask[:, :-1]], dim=1)
    hidden = body(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                  use_cache=False).last_hidden_state
    where = completion_mask.reshape(-1).nonzero().squeeze(1)
    return hidden[:, -C:, :].reshape(B * C, -1).index_select(0, where)  # position t predicts token t+1


def completion_logprobs(lm, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                        completion_mask: torch.Tensor, temperature: float = 1.0, with_entropy: bool = False,
                        share_prefix: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log pi(completion token | prefix): logp (B, C) fp32, and entropy (B, C) (no grad) or None.
    Positions outside completion_mask are 0 in both (never computed: no head, no softmax)."""
    hf, body, head = _body_and_head(lm)
    picked = completion_hidden(body, prompt_ids, prompt_mask, completion_ids, completion_mask, share_prefix)
    B, C = completion_ids.shape
    where = completion_mask.reshape(-1).nonzero().squeeze(1)
    logp, entropy = token_logprobs(picked, completion_ids.reshape(-1).index_select(0, where), head,
                                   temperature=temperature, with_entropy=with_entropy,
                                   softcap=getattr(hf.config, "final_logit_softcapping", None))

    def spread(values: torch.Tensor) -> torch.Tensor:
        return values.new_zeros(B * C).index_copy(0, where, values).view(B, C)

    return spread(logp), (spread(entropy) if with_entropy else None)


class PolicyLogprobs(torch.nn.Module):
    """The causal LM wrapped so that one ``forward`` call returns completion log-probs.

    This is the module handed to ``accelerator.prepare``: DDP / DeepSpeed / FSDP then see a single
    forward per micro-batch even when the shared-prefix path runs the LM twice inside it.
    The HF model is ``.lm`` (exported and used for sampling as is).
    """

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.tree = use_prefix_tree(lm)  # False: the model's attention cannot be the tree's (plain forward)

    def forward(self, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature: float = 1.0,
                with_entropy: bool = False, share_prefix: bool = False):
        return completion_logprobs(self.lm, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                   temperature, with_entropy, share_prefix and self.tree)
