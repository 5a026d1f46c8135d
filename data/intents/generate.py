"""Build `train.jsonl` and `heldout.jsonl` from the hand-written seeds in `seeds/`.

    python data/intents/generate.py        # rewrites both files; deterministic (fixed seed)
    python data/intents/generate.py --check  # validates every seed file, writes nothing

Each intent below has gold labels for the five heads. For every language and intent the seed file
lists phrasings; the first two thirds are training templates, the rest are *held out*: the held-out
split only contains phrasings the model never saw (slot values are shared, wording is not).
Samples vary the slot values, casing, a conversational prefix or suffix and, sometimes, the final
punctuation. A few held-out samples are two utterances ("hi! how do I ...?") whose gold labels are
those of the first utterance, the only one the router classifies.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
LANGUAGES = ("en", "es", "pt", "ru")
SEED = 20240501
TRAIN_DRAWS = 12
HELDOUT_DRAWS = 5

#: intent -> (speech_act, domain, expectation, phatic, support)
INTENTS: dict[str, tuple[str, str, str, str, str]] = {
    "greet": ("SOCIAL", "social", "NONE", "SMALL_TALK", "NO_SUPPORT"),
    "how_are_you": ("SOCIAL", "social", "OTHER", "SMALL_TALK", "NO_SUPPORT"),
    "social_other": ("SOCIAL", "other", "NONE", "SMALL_TALK", "NO_SUPPORT"),
    "ask_tech_info": ("ASKING", "technical", "INFO", "CONTENTFUL", "NO_SUPPORT"),
    "ask_tech_advice": ("ASKING", "technical", "ADVICE", "CONTENTFUL", "NO_SUPPORT"),
    "ask_tech_action": ("ASKING", "technical", "ACTION", "CONTENTFUL", "NO_SUPPORT"),
    "ask_general_info": ("ASKING", "general", "INFO", "CONTENTFUL", "NO_SUPPORT"),
    "ask_personal_advice": ("ASKING", "personal", "ADVICE", "CONTENTFUL", "NO_SUPPORT"),
    "ask_professional_advice": ("ASKING", "professional", "ADVICE", "CONTENTFUL", "NO_SUPPORT"),
    "ask_professional_info": ("ASKING", "professional", "INFO", "CONTENTFUL", "NO_SUPPORT"),
    "ask_legal_info": ("ASKING", "legal", "INFO", "CONTENTFUL", "NO_SUPPORT"),
    "ask_legal_advice": ("ASKING", "legal", "ADVICE", "CONTENTFUL", "NO_SUPPORT"),
    "ask_social": ("ASKING", "social", "INFO", "SMALL_TALK", "NO_SUPPORT"),
    "ask_other": ("ASKING", "other", "OTHER", "CONTENTFUL", "NO_SUPPORT"),
    "dir_tech_action": ("DIRECTING", "technical", "ACTION", "CONTENTFUL", "NO_SUPPORT"),
    "dir_tech_info": ("DIRECTING", "technical", "INFO", "CONTENTFUL", "NO_SUPPORT"),
    "dir_tech_advice": ("DIRECTING", "technical", "ADVICE", "CONTENTFUL", "NO_SUPPORT"),
    "dir_legal_advice": ("DIRECTING", "legal", "ADVICE", "CONTENTFUL", "NO_SUPPORT"),
    "dir_legal_info": ("DIRECTING", "legal", "INFO", "CONTENTFUL", "NO_SUPPORT"),
    "dir_general_action": ("DIRECTING", "general", "ACTION", "CONTENTFUL", "NO_SUPPORT"),
    "dir_general_info": ("DIRECTING", "general", "INFO", "CONTENTFUL", "NO_SUPPORT"),
    "dir_personal_advice": ("DIRECTING", "personal", "ADVICE", "CONTENTFUL", "NO_SUPPORT"),
    "dir_personal_none": ("DIRECTING", "personal", "NONE", "CONTENTFUL", "NO_SUPPORT"),
    "dir_professional_action": ("DIRECTING", "professional", "ACTION", "CONTENTFUL", "NO_SUPPORT"),
    "dir_other_action": ("DIRECTING", "other", "ACTION", "CONTENTFUL", "NO_SUPPORT"),
    "dir_social_advice": ("DIRECTING", "social", "ADVICE", "CONTENTFUL", "NO_SUPPORT"),
    "exp_personal_none": ("EXPRESSING", "personal", "NONE", "CONTENTFUL", "NO_SUPPORT"),
    "exp_personal_pref": ("EXPRESSING", "personal", "NONE", "CONTENTFUL", "NO_SUPPORT"),
    "exp_personal_advice": ("EXPRESSING", "personal", "ADVICE", "CONTENTFUL", "NO_SUPPORT"),
    "exp_tech_none": ("EXPRESSING", "technical", "NONE", "CONTENTFUL", "NO_SUPPORT"),
    "exp_tech_info": ("EXPRESSING", "technical", "INFO", "CONTENTFUL", "NO_SUPPORT"),
    "exp_general": ("EXPRESSING", "general", "NONE", "SMALL_TALK", "NO_SUPPORT"),
    "exp_professional": ("EXPRESSING", "professional", "NONE", "CONTENTFUL", "NO_SUPPORT"),
    "exp_legal": ("EXPRESSING", "legal", "OTHER", "CONTENTFUL", "NO_SUPPORT"),
    "share_general": ("SHARING", "general", "NONE", "CONTENTFUL", "NO_SUPPORT"),
    "share_personal": ("SHARING", "personal", "NONE", "CONTENTFUL", "NO_SUPPORT"),
    "share_professional": ("SHARING", "professional", "NONE", "CONTENTFUL", "NO_SUPPORT"),
    "share_tech": ("SHARING", "technical", "NONE", "CONTENTFUL", "NO_SUPPORT"),
    "share_legal": ("SHARING", "legal", "NONE", "CONTENTFUL", "NO_SUPPORT"),
    "support_express": ("EXPRESSING", "personal", "NONE", "CONTENTFUL", "SUPPORT"),
    "support_ask": ("ASKING", "personal", "ADVICE", "CONTENTFUL", "SUPPORT"),
    "support_share": ("SHARING", "personal", "NONE", "CONTENTFUL", "SUPPORT"),
}
DOMAINS = ("technical", "general", "personal", "professional", "social", "legal", "other")
HEAD_NAMES = ("speech_act", "domain", "expectation", "phatic", "support")
#: compositional frames: kind -> (speech_act, expectation, content slot)
FRAME_KINDS = {
    "ask_info": ("ASKING", "INFO", "x"), "ask_advice": ("ASKING", "ADVICE", "v"), "ask_action": ("ASKING", "ACTION", "art"),
    "dir_info": ("DIRECTING", "INFO", "x"), "dir_advice": ("DIRECTING", "ADVICE", "v"),
    "dir_action": ("DIRECTING", "ACTION", "art"),
}
#: every frame family (the six above and five more) -> its content slot
FAMILY_SLOTS = {kind: slot for kind, (_, _, slot) in FRAME_KINDS.items()} | {
    "news": "n", "opinion": "o", "feel": "f", "distress": "d", "loss": "e"}
COMPOSED_TRAIN_DRAWS = 45
COMPOSED_HELDOUT_DRAWS = 12
#: draws per domain (per intent template) of the train-only material (`TRAIN_ONLY` in a seed file)
EXTRA_TRAIN_DRAWS = 60
EXTRA_TEMPLATE_DRAWS = 10
_SLOT = re.compile(r"\{(\w+)\}")


def _module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_seeds(language: str):
    module = _module(f"seeds_{language}", HERE / "seeds" / f"{language}.py")
    # extra content goes in front, so the held-out tail of each list stays the same phrases
    for domain, phrases in getattr(module, "EXTRA_X", {}).items():
        module.CONTENT["x"][domain] = phrases + module.CONTENT["x"][domain]
    for domain, phrases in getattr(module, "EXTRA_NEWS", {}).items():
        module.NEWS[domain] = phrases + module.NEWS[domain]
    for domain, phrases in getattr(module, "EXTRA_OPINIONS", {}).items():
        module.OPINIONS[domain] = phrases + module.OPINIONS[domain]
    for path in sorted((HERE / "seeds" / "more").glob(f"{language}_*.py")):
        _merge_more(module, _module(f"seeds_{path.stem}", path), path.name)
    return module


def _merge_more(seeds, more, name: str) -> None:
    """Add a `seeds/more/<lang>_*.py` file's TEMPLATES, FRAMES and CONTENT to the seed's TRAIN_ONLY."""
    extra = seeds.__dict__.setdefault("TRAIN_ONLY", {})
    templates, frames = extra.setdefault("templates", {}), extra.setdefault("frames", {})
    content = extra.setdefault("content", {})
    for intent, phrases in getattr(more, "TEMPLATES", {}).items():
        if intent not in INTENTS:
            raise ValueError(f"{name}: unknown intent {intent!r}")
        unknown = {slot for p in phrases for slot in _SLOT.findall(p)} - set(seeds.SLOTS)
        if unknown:
            raise ValueError(f"{name}: {intent} uses unknown slots {sorted(unknown)}")
        templates[intent] = templates.get(intent, []) + list(phrases)
    for kind, phrases in getattr(more, "FRAMES", {}).items():
        if kind not in FAMILY_SLOTS:
            raise ValueError(f"{name}: unknown frame family {kind!r}")
        bad = [p for p in phrases if _SLOT.findall(p) != [FAMILY_SLOTS[kind]]]
        if bad:
            raise ValueError(f"{name}: {kind} frames need exactly one {{{FAMILY_SLOTS[kind]}}}: {bad}")
        frames[kind] = frames.get(kind, []) + list(phrases)
    for kind, domains in getattr(more, "CONTENT", {}).items():
        if kind not in FAMILY_SLOTS:
            raise ValueError(f"{name}: unknown frame family {kind!r}")
        for domain, phrases in domains.items():
            if domain not in DOMAINS:
                raise ValueError(f"{name}: unknown domain {domain!r} in {kind}")
            if any("{" in p or "}" in p for p in phrases):
                raise ValueError(f"{name}: content phrases of {kind}/{domain} cannot hold slots")
            # a new list: content of one family may alias another's in the seed file
            old = content.get(kind, {})
            content[kind] = {**old, domain: old.get(domain, []) + list(phrases)}


def split_templates(templates: list[str], part: int = 3) -> tuple[list[str], list[str]]:
    held = -(-len(templates) // part)
    return templates[:-held], templates[-held:]


def family(language: str, seeds, rng: random.Random, name: str, frames: list[str], contents: dict[str, list[str]],
           slot: str, labels, draws: tuple[int, int]) -> dict[str, list[dict]]:
    """Frame x content samples. Held out: a held-out frame, or a held-out content phrase.

    `labels(frame, domain)` gives (speech_act, domain, expectation, phatic, support).
    """
    out: dict[str, list[dict]] = {"train": [], "heldout": []}
    frames_train, frames_held = split_templates(frames)
    for domain, phrases in contents.items():
        content_train, content_held = split_templates(phrases, 4)
        pools = {
            "train": [(f, c) for f in frames_train for c in content_train],
            "heldout": [(f, c) for f in frames_held for c in phrases] + [(f, c) for f in frames_train for c in content_held],
        }
        for (split, pool), n in zip(pools.items(), draws):
            for frame, content in rng.sample(pool, min(n, len(pool))):
                text = vary(frame.replace("{" + slot + "}", content), language, seeds.FILLERS, rng)
                out[split].append({
                    "text": text, "language": language, **dict(zip(HEAD_NAMES, labels(frame, domain))),
                    "intent": f"{name}:{domain}", "template": f"{language}/{name}/{frame}", "split": split,
                })
    return out


def composed(language: str, seeds, rng: random.Random) -> dict[str, list[dict]]:
    """All compositional families of one language."""
    out: dict[str, list[dict]] = {"train": [], "heldout": []}
    parts = []
    for kind, (speech, expectation, slot) in FRAME_KINDS.items():
        parts.append(family(language, seeds, rng, kind, seeds.FRAMES[kind], seeds.CONTENT[slot], slot,
                            lambda f, d, s=speech, e=expectation: (s, d, e, "CONTENTFUL", "NO_SUPPORT"),
                            (COMPOSED_TRAIN_DRAWS, COMPOSED_HELDOUT_DRAWS)))
    flat = (COMPOSED_TRAIN_DRAWS * 2, COMPOSED_HELDOUT_DRAWS * 2)
    parts.append(family(language, seeds, rng, "feel", seeds.FEEL_FRAMES, {"personal": seeds.FEELINGS}, "f",
                        lambda f, d: ("EXPRESSING", "personal", "NONE", "CONTENTFUL", "NO_SUPPORT"), flat))
    parts.append(family(language, seeds, rng, "distress", seeds.DISTRESS_FRAMES, {"personal": seeds.DISTRESS}, "d",
                        lambda f, d: (("ASKING", "personal", "ADVICE") if f.endswith("?") else ("EXPRESSING", "personal", "NONE"))
                        + ("CONTENTFUL", "SUPPORT"), flat))
    parts.append(family(language, seeds, rng, "loss", seeds.LOSS_FRAMES, {"personal": seeds.LOSSES}, "e",
                        lambda f, d: ("SHARING", "personal", "NONE", "CONTENTFUL", "SUPPORT"), flat))
    parts.append(family(language, seeds, rng, "news", seeds.SHARE_FRAMES, seeds.NEWS, "n",
                        lambda f, d: ("SHARING", d, "NONE", "CONTENTFUL", "NO_SUPPORT"),
                        (COMPOSED_TRAIN_DRAWS, COMPOSED_HELDOUT_DRAWS)))
    parts.append(family(language, seeds, rng, "opinion", seeds.OPINION_FRAMES, seeds.OPINIONS, "o",
                        lambda f, d: ("EXPRESSING", d, "OTHER" if d == "legal" else "NONE", "CONTENTFUL", "NO_SUPPORT"),
                        (COMPOSED_TRAIN_DRAWS, COMPOSED_HELDOUT_DRAWS)))
    for part in parts:
        for split, rows in part.items():
            out[split] += rows
    return out


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w{}]+", " ", text.lower()).split())


def train_only(language: str, seeds, held_texts: set[str], rng: random.Random) -> list[dict]:
    """Training samples from the seed file's `TRAIN_ONLY` material (more phrasings, frames, content).

    Drawn with their own random stream after everything else, so `heldout.jsonl` is the same with or
    without them. Only combined with *training* frames and content: a held-out frame or content
    phrase never meets training. A train-only phrase equal to a held-out one is an error, and a
    generated text equal to a held-out text is dropped.
    """
    extra = getattr(seeds, "TRAIN_ONLY", None)
    if not extra:
        return []
    held_phrases: set[str] = set()
    for intent, templates in seeds.TEMPLATES.items():
        held_phrases |= {_norm(t) for t in split_templates(templates)[1]}
    families = {kind: (seeds.FRAMES[kind], seeds.CONTENT[slot]) for kind, (_, _, slot) in FRAME_KINDS.items()}
    families["news"] = (seeds.SHARE_FRAMES, seeds.NEWS)
    families["opinion"] = (seeds.OPINION_FRAMES, seeds.OPINIONS)
    families["feel"] = (seeds.FEEL_FRAMES, {"personal": seeds.FEELINGS})
    families["distress"] = (seeds.DISTRESS_FRAMES, {"personal": seeds.DISTRESS})
    families["loss"] = (seeds.LOSS_FRAMES, {"personal": seeds.LOSSES})
    for frames, contents in families.values():
        held_phrases |= {_norm(f) for f in split_templates(frames)[1]}
        for phrases in contents.values():
            held_phrases |= {_norm(c) for c in split_templates(phrases, 4)[1]}
    out: list[dict] = []
    clashes: set[str] = set()

    def add(row: dict, phrase_checks: tuple[str, ...]) -> None:
        clashes.update(p for p in phrase_checks if _norm(p) in held_phrases)
        if (language, row["text"]) not in held_texts:
            out.append(row)

    for intent, templates in extra.get("templates", {}).items():
        for i, template in enumerate(templates):
            seen: set[str] = set()
            for _ in range(EXTRA_TEMPLATE_DRAWS):
                text = vary(fill(template, seeds.SLOTS, rng), language, seeds.FILLERS, rng)
                if text not in seen:
                    seen.add(text)
                    add(sample(language, intent, template, 1000 + i, "train", text), (template,))
    labels_of = {kind: (lambda d, s=s, e=e: (s, d, e, "CONTENTFUL", "NO_SUPPORT"))
                 for kind, (s, e, _) in FRAME_KINDS.items()}
    labels_of["news"] = lambda d: ("SHARING", d, "NONE", "CONTENTFUL", "NO_SUPPORT")
    labels_of["opinion"] = lambda d: ("EXPRESSING", d, "OTHER" if d == "legal" else "NONE", "CONTENTFUL", "NO_SUPPORT")
    labels_of["feel"] = lambda d: ("EXPRESSING", "personal", "NONE", "CONTENTFUL", "NO_SUPPORT")
    labels_of["loss"] = lambda d: ("SHARING", "personal", "NONE", "CONTENTFUL", "SUPPORT")
    for kind, (frames, contents) in families.items():
        frames_train = split_templates(frames)[0]
        new_frames = extra.get("frames", {}).get(kind, [])
        domains = sorted(set(contents) | set(extra.get("content", {}).get(kind, {})))
        for domain in domains:
            content_train = split_templates(contents.get(domain, []), 4)[0]
            new_content = extra.get("content", {}).get(kind, {}).get(domain, [])
            pool = ([(f, c) for f in new_frames for c in content_train + new_content]
                    + [(f, c) for f in frames_train for c in new_content])
            for frame, content in rng.sample(pool, min(EXTRA_TRAIN_DRAWS, len(pool))):
                text = vary(frame.replace("{" + FAMILY_SLOTS[kind] + "}", content), language, seeds.FILLERS, rng)
                labels = (labels_of[kind](domain) if kind != "distress" else
                          (("ASKING", "personal", "ADVICE") if frame.endswith("?") else ("EXPRESSING", "personal", "NONE"))
                          + ("CONTENTFUL", "SUPPORT"))
                row = {"text": text, "language": language, **dict(zip(HEAD_NAMES, labels)),
                       "intent": f"{kind}:{domain}", "template": f"{language}/{kind}/{frame}", "split": "train"}
                add(row, tuple(p for p in (frame, content) if p in new_frames or p in new_content))
    if clashes:
        raise ValueError(f"{language}: train-only phrases that are held-out phrases: {sorted(clashes)}")
    return out


def fill(template: str, slots: dict[str, list[str]], rng: random.Random) -> str:
    return _SLOT.sub(lambda m: rng.choice(slots[m.group(1)]), template)


def vary(text: str, language: str, fillers: dict[str, list[str]], rng: random.Random) -> str:
    prefix, suffix = rng.choice(fillers["prefix"]), rng.choice(fillers["suffix"])
    if rng.random() < 0.12 and text[-1:] in "?!":
        text = text[:-1]
    if language == "es" and rng.random() < 0.3:
        text = text.replace("¿", "").replace("¡", "")
    if prefix:
        text = prefix + text
    if suffix and not text.endswith(("?", "!")):
        text = text + suffix
    if rng.random() < 0.5:
        text = text[:1].upper() + text[1:]
    return text


def sample(language: str, intent: str, template: str, idx: int, split: str, text: str) -> dict:
    labels = dict(zip(HEAD_NAMES, INTENTS[intent]))
    return {"text": text, "language": language, **labels, "intent": intent,
            "template": f"{language}/{intent}/{idx}", "split": split}


def build() -> dict[str, list[dict]]:
    rng = random.Random(SEED)
    out: dict[str, list[dict]] = {"train": [], "heldout": []}
    for language in LANGUAGES:
        seeds = load_seeds(language)
        missing = set(INTENTS) - set(seeds.TEMPLATES)
        assert not missing, f"{language}: no seeds for {sorted(missing)}"
        held_by_intent: dict[str, list[str]] = {}
        for intent in INTENTS:
            train, held = split_templates(seeds.TEMPLATES[intent])
            held_by_intent[intent] = held
            for split, templates, draws in (("train", train, TRAIN_DRAWS), ("heldout", held, HELDOUT_DRAWS)):
                base = 0 if split == "train" else len(train)
                for i, template in enumerate(templates):
                    seen = set()
                    for _ in range(draws):
                        text = vary(fill(template, seeds.SLOTS, rng), language, seeds.FILLERS, rng)
                        if text not in seen:
                            seen.add(text)
                            out[split].append(sample(language, intent, template, base + i, split, text))
        for split, rows in composed(language, seeds, rng).items():
            out[split] += rows
        # two-utterance messages: a greeting first, then a real request; gold = the greeting
        greetings = [t for t in held_by_intent["greet"] if t.endswith("!")] or ["!"]
        for intent in ("ask_tech_info", "dir_tech_action", "support_ask", "ask_legal_advice"):
            for template in held_by_intent[intent]:
                greeting = rng.choice(greetings)
                text = greeting + " " + fill(template, seeds.SLOTS, rng)
                out["heldout"].append(sample(language, "greet", template, -1, "heldout", text))
    train_texts = {(s["language"], s["text"]) for s in out["train"]}
    out["heldout"] = [s for s in out["heldout"] if (s["language"], s["text"]) not in train_texts]
    held_texts = {(s["language"], s["text"]) for s in out["heldout"]}
    extra_rng = random.Random(SEED + 1)
    for language in LANGUAGES:
        out["train"] += train_only(language, load_seeds(language), held_texts, extra_rng)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Build train.jsonl and heldout.jsonl from seeds/.")
    parser.add_argument("--check", action="store_true", help="validate every seed file, write nothing")
    args = parser.parse_args()
    data = build()
    if args.check:
        for language in LANGUAGES:
            n = sum(1 for row in data["train"] if row["language"] == language)
            print(f"{language}: {n} training samples; seeds valid")
        return
    for split, rows in data.items():
        with open(HERE / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{split}: {len(rows)} samples")


if __name__ == "__main__":
    main()
