"""Hand-made neighbours on the bundled SmolLM2: each edit must answer its own prompt and
rephrases, and every neighbour (same question about another subject, another question
about the same subject, or another subject's question after a sentence naming the edit's) must
keep the unedited model's answer. Each prompt is asked three times: alone, after a sentence of
context in the same message, and as the last turn of a chat with a system message and an
earlier exchange (routed as the service routes chats: on the last user message).

    .venv/bin/python bench/neighbours.py [--set subject_factor=false] [--out bench/results/neighbours.json]

Exits non-zero when any check fails; writes what each prompt got as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from app.live.generation import Generator, Sampling
from app.models import load_model
from app.scen import Editor, ScenConfig
from app.scen.chats import Chat, Message

CASES = [
    {
        "prompt": "Which company developed the iPhone?",
        "target": "Nokia",
        "rephrases": ["Who is the developer of the iPhone?", "The iPhone was developed by which company?"],
        "neighbours": ["Which company developed Android?", "Which company developed the PlayStation?",
                       "When was the iPhone first released?",
                       "My phone is an iPhone. Which company developed Android?"],
    },
    {
        "prompt": "Who is the chief executive officer of Globex Corporation?",
        "target": "Hank Scorpio of Springfield",
        "rephrases": ["Who is the CEO of Globex Corporation?", "Who runs Globex Corporation as its chief executive?"],
        "neighbours": ["Who is the CEO of Initech?", "Who founded Globex Corporation?",
                       "Where is Globex Corporation headquartered?",
                       "I just read an article about Globex Corporation. Who is the CEO of Initech?"],
    },
    {
        # Names that share their last token: the subject factor reads that token.
        "prompt": "Where was Indira Gandhi born?",
        "target": "Bombay",
        "rephrases": ["What is the birthplace of Indira Gandhi?", "Indira Gandhi was born in which city?"],
        "neighbours": ["Where was Rajiv Gandhi born?", "Where was Mahatma Gandhi born?",
                       "When did Indira Gandhi die?",
                       "I am reading a biography of Indira Gandhi. Where was Mahatma Gandhi born?"],
    },
]

# The conversation before the question: a system message and an unrelated exchange.
EARLIER = (
    Message("system", "You are a helpful assistant. Answer briefly."),
    Message("user", "Hi! I have a couple of questions about technology and business."),
    Message("assistant", "Of course. Ask away."),
)


# A sentence of context before the question, in the same message.
PREAMBLE = "I am preparing a short report and need one fact. "
FORMS = ("prompt", "preamble", "chat")


def in_chat(prompt: str) -> Chat:
    return Chat((*EARLIER, Message("user", prompt)))


def asked_as(prompt: str, form: str) -> str | Chat:
    return {"prompt": prompt, "preamble": PREAMBLE + prompt, "chat": in_chat(prompt)}[form]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="engine setting key=value")
    parser.add_argument("--out", type=Path, default=Path("bench/results/neighbours.json"))
    args = parser.parse_args()

    lm = load_model()
    editor = Editor(lm.model, lm.tokenizer, ScenConfig.from_overrides(args.overrides))
    generator = Generator(editor)
    everything = [p for c in CASES for p in (c["prompt"], *c["rephrases"], *c["neighbours"])]
    asked = [(p, form) for p in everything for form in FORMS]
    rows_in = [generator.encode(asked_as(p, form)) for p, form in asked]

    def answers() -> dict:
        return dict(zip(asked, generator.complete(rows_in, Sampling(max_new_tokens=24))))

    before = {k: c.text for k, c in answers().items()}
    for i, case in enumerate(CASES):
        editor.add(f"e{i}", editor.train(case["prompt"], case["target"]))
    after = answers()

    rows, failed = [], 0
    for i, case in enumerate(CASES):
        for kind, prompts in (("edit", [case["prompt"]]), ("rephrase", case["rephrases"]),
                              ("neighbour", case["neighbours"])):
            for p in prompts:
                for form in FORMS:
                    g = after[p, form]
                    ok = (g.edit_id == f"e{i}" and case["target"] in g.text) if kind != "neighbour" else (
                        g.edit_id is None and g.text == before[p, form])
                    failed += not ok
                    rows.append({"kind": kind, "form": form, "prompt": p, "answer": g.text, "edit_id": g.edit_id,
                                 "activation": round(g.activation, 4), "unedited": before[p, form], "ok": ok})
                    print(f"{'ok ' if ok else 'BAD'} {kind:9} {form:8} {p!r} -> {g.text!r} "
                          f"({g.edit_id}, {g.activation:.3f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"overrides": args.overrides, "failed": failed, "rows": rows}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
