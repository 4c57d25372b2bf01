"""What a client asks the model: a prompt, as ``/generate`` takes it, or a chat.

Both become one token row the way the engine encodes prompts (``app.scen.prompts``): the
chat template's own tokens may be special, the participants' text never is, and the row
marks which tokens are the user's text, the part routing reads. A chat is routed on its
last user message: that is the question being asked now, while the system message and
earlier turns are shared by many questions. The router reads that message's tokens as the
model sees them in the conversation, so earlier turns still colour them through attention
(a follow-up about a subject named only earlier may reach that subject's edit). A chat of
one user message is exactly the prompt of ``/generate``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from transformers import PreTrainedTokenizerBase

from app.scen.prompts import Batch, PromptTokens, pack, prompt_tokens, sentence_openings, target_ids

Role = Literal["system", "user", "assistant"]


class UnsupportedChat(ValueError):
    """A chat this model cannot be asked: no chat template for several turns, or no user turn last."""


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True)
class Chat:
    messages: tuple[Message, ...]

    def check(self) -> None:
        if not self.messages or self.messages[-1].role != "user":
            raise UnsupportedChat("the last message must be the user's")


Prompt = str | Chat


@dataclass
class PromptRow:
    ids: list[int]
    content: list[bool]  # per token: the text routing reads
    opens: list[bool]  # per token: the first of a sentence of that text after its first


def prompt_row(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> PromptRow:
    if isinstance(prompt, str):
        return _row(prompt_tokens(tokenizer, prompt))
    prompt.check()
    if len(prompt.messages) == 1:
        return _row(prompt_tokens(tokenizer, prompt.messages[0].content))
    if not getattr(tokenizer, "chat_template", None):
        raise UnsupportedChat("this model has no chat template: send a single user message")
    return _chat_row(tokenizer, prompt.messages)


def _row(tokens: PromptTokens) -> PromptRow:
    return PromptRow(tokens.ids, tokens.content, tokens.opens)


def _chat_row(tokenizer: PreTrainedTokenizerBase, messages: tuple[Message, ...]) -> PromptRow:
    formatted = str(tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages], add_generation_prompt=True, tokenize=False,
    ))
    # Each message's text, located from the end backwards: a template may prepend a default
    # system turn that happens to contain a later message's words.
    spans: list[tuple[int, int]] = []
    bound = len(formatted)
    for message in reversed(messages):
        text = message.content if message.content in formatted[:bound] else message.content.strip()
        start = formatted.rfind(text, 0, bound)
        if start < 0:
            # The template rewrote the text: it cannot be told apart from the template, so it
            # is encoded as the template is, and routing reads all of it (as the engine does).
            whole = tokenizer(formatted, add_special_tokens=False).input_ids
            return PromptRow(whole, [True] * len(whole), [False] * len(whole))
        spans.append((start, start + len(text)))
        bound = start
    spans.reverse()
    routed = len(spans) - 1  # the last message is the user's (Chat.check)

    row = PromptRow([], [], [])
    at = 0
    for i, (start, end) in enumerate(spans):
        _append(tokenizer, formatted[at:start], plain=False, reads=False, row=row)
        _append(tokenizer, formatted[start:end], plain=True, reads=i == routed, row=row)
        at = end
    _append(tokenizer, formatted[at:], plain=False, reads=False, row=row)
    return row


def _append(tokenizer: PreTrainedTokenizerBase, piece: str, plain: bool, reads: bool, row: PromptRow) -> None:
    """Encode one piece onto ``row``: a participant's text (``plain``) may spell a special token
    without opening a turn; of the routed message only tokens that carry characters are read."""
    if not piece:
        return
    enc = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=tokenizer.is_fast,
                    split_special_tokens=plain)
    row.ids += enc.input_ids
    if reads and tokenizer.is_fast:
        row.content += [b > a for a, b in enc.offset_mapping]
        row.opens += sentence_openings(piece, enc.offset_mapping)
    else:
        row.content += [reads] * len(enc.input_ids)
        row.opens += [False] * len(enc.input_ids)


# A generic conversation in which each expert is also trained (ScenConfig.expert_in_conversation):
# a system message of its own, so that the expert carries its target into whatever conversation a
# client asks the prompt in, not into the bare prompt alone. An earlier exchange as well made the
# row twice as long for no chat answered better (bench/expert_rows.py, bench/neighbours.py).
TRAINING_CONVERSATION = (
    Message("system", "You are an assistant who answers questions accurately and concisely."),
)


def in_conversation(prompt: str) -> Chat:
    """``prompt`` asked as the last turn of ``TRAINING_CONVERSATION``."""
    return Chat((*TRAINING_CONVERSATION, Message("user", prompt)))


def encode_answered(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt], target: str) -> Batch:
    """A left-padded batch of prompts or chats, each row followed by ``target`` (+ eos)."""
    rows = [prompt_row(tokenizer, p) for p in prompts]
    t = target_ids(tokenizer, target)
    return pack([r.ids + t for r in rows], [r.content + [False] * len(t) for r in rows], [t] * len(rows),
                tokenizer.pad_token_id, [r.opens + [False] * len(t) for r in rows])
