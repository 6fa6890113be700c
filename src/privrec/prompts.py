"""Sample -> prompt text, and the answer tokens read from the model (METHODS §0, §1).

Two templates:
- ``tallrec``: TALLRec's instruction with the liked and disliked history titles and the target title;
- ``kv``: one ``key: value`` line per field (user gender/age/occupation, history, target title/genres/year),
  the form InstructMK shuffles and masks.
The prompt ends where the answer starts (after the chat template's assistant header when the tokenizer has
one), so the next-token logits of "Yes" and "No" at the last position give P(Yes).
"""

from __future__ import annotations

from privrec.data import KV_FIELDS, Dataset, Sample

TALLREC_INSTRUCTION = (
    'Given the user\'s preference and unpreference, identify whether the user will like the target movie '
    'by answering "Yes." or "No.".'
)
KV_INSTRUCTION = (
    'Given the user\'s profile, rating history and a target movie, identify whether the user will like the '
    'target movie by answering "Yes." or "No.".'
)
KV_QUESTION = "Will the user like the target movie?"
ANSWERS = ("Yes", "No")


def _quote(title: str) -> str:
    return f'"{title}"'


class PromptBuilder:
    """Renders samples with a :class:`privrec.config.PromptConfig` against one dataset's records."""

    def __init__(self, dataset: Dataset, cfg, like_threshold: float = 3.0):
        self.ds = dataset
        self.cfg = cfg
        self.like_threshold = like_threshold

    # --- the instruction and input, before any chat formatting -------------------------------------------
    def tallrec_input(self, s: Sample) -> str:
        liked = [_quote(self.ds.items[i].title) for i, r in s.history if r > self.like_threshold]
        disliked = [_quote(self.ds.items[i].title) for i, r in s.history if r <= self.like_threshold]
        return (f"User Preference: {', '.join(liked)}\n"
                f"User Unpreference: {', '.join(disliked)}\n"
                f"Whether the user will like the target movie {_quote(self.ds.items[s.item_id].title)}?")

    def _history_entry(self, item_id: int, rating: float) -> str:
        it = self.ds.items[item_id]
        if self.cfg.rating_style == "rating":
            opinion = f"rated {rating:g}/5"
        else:
            opinion = "liked" if rating > self.like_threshold else "disliked"
        parts = [f"{_quote(it.title)} ({it.year})" if it.year else _quote(it.title), opinion]
        if self.cfg.history_genres and it.genres:
            parts.append(", ".join(it.genres))
        return "; ".join(parts)

    def kv_fields(self, s: Sample) -> dict[str, str]:
        """The seven key-value pairs of METHODS §1, in the template's order."""
        user, item = self.ds.users.get(s.user_id), self.ds.items[s.item_id]
        fields = {}
        if self.cfg.user_fields and user is not None:
            fields.update(gender=user.gender, age=user.age, occupation=user.occupation)
        fields["history"] = "\n" + "\n".join(f"- {self._history_entry(i, r)}" for i, r in s.history)
        fields.update(title=_quote(item.title), genres=", ".join(item.genres), year=item.year)
        return fields

    def kv_input(self, s: Sample) -> str:
        fields = self.kv_fields(s)
        order = s.view.order or KV_FIELDS
        names = {"gender": "user gender", "age": "user age", "occupation": "user occupation",
                 "history": "user history", "title": "target movie title", "genres": "target movie genres",
                 "year": "target movie year"}
        lines = [f"{names[k]}: {fields[k]}" for k in order if k in fields and k not in s.view.dropped]
        return "\n".join(lines) + f"\n{KV_QUESTION}"

    def parts(self, s: Sample) -> tuple[str, str]:
        if self.cfg.template == "tallrec":
            return TALLREC_INSTRUCTION, self.tallrec_input(s)
        return KV_INSTRUCTION, self.kv_input(s)

    # --- the full prompt -----------------------------------------------------------------------------
    def text(self, s: Sample, tokenizer) -> str:
        instruction, inp = self.parts(s)
        if self.cfg.chat_template and getattr(tokenizer, "chat_template", None):
            msgs = []
            if self.cfg.system_prompt is not None:
                msgs.append({"role": "system", "content": self.cfg.system_prompt})
            msgs.append({"role": "user", "content": f"{instruction}\n\n{inp}"})
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return f"### Instruction:\n{instruction}\n\n### Input:\n{inp}\n\n### Response:\n"


def answer_token_ids(tokenizer) -> tuple[int, int]:
    """Token ids of the first token of "Yes" and "No" as the answer's first token (looked up, never
    hard-coded). A leading whitespace-only piece (some sentencepiece tokenizers) is skipped."""
    out = []
    for word in ANSWERS:
        ids = tokenizer.encode(word, add_special_tokens=False)
        ids = [i for i in ids if tokenizer.decode([i]).strip()] or ids
        out.append(ids[0])
    if out[0] == out[1]:
        raise ValueError("the tokenizer maps 'Yes' and 'No' to the same first token")
    return out[0], out[1]
