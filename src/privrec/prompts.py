"""Sample -> prompt text, and the answer tokens read from the model (METHODS §0, §1).

Two templates:
- ``tallrec``: TALLRec's instruction with the liked and disliked history titles and the target title;
- ``kv``: one ``key: value`` line per field (user gender/age/occupation, history, target title/genres/year),
  the form InstructMK shuffles and masks.
The prompt ends where the answer starts (after the chat template's assistant header when the tokenizer has
one), so the next-token logits of "Yes" and "No" at the last position give P(Yes).

Every like-prompt is cut in two at one fixed boundary (:meth:`PromptBuilder.split`): the *prefix* (chat
header, instruction and every field before the first target-item field: for the templates' own order, the
user's fields and history) and the *suffix* (the target item's fields, the question, and the rest through
the assistant header). All of a user's candidates share the prefix, which is what shared-prefix ranking
scores once (METHODS §1). The model tokenises every prompt as ``ids(prefix) + ids(suffix)``, so the
full-prompt path and the shared-prefix path see identical token ids.

Two optional lines make the references' counters readable (both off by default, both templates):
``prompt.history_summary`` counts the liked history items ("The user liked 7 of these 10 movies.", part of
the prefix: it depends on the history only), and ``prompt.item_stats`` gives the target movie's like-rate
among the run's training pool, the item-mean reference's estimate (:class:`privrec.data.ItemStats`, handed
in by the caller; part of the suffix).

The next-item prompt (:meth:`PromptBuilder.next_item_prompt`, BIGRec-style) lists the candidates and asks
which one the user watches next; a candidate's score is the log-likelihood of its title
(:meth:`PromptBuilder.item_answer`) after the prompt.
"""

from __future__ import annotations

from privrec.data import MOVIELENS, Dataset, ItemStats, RecordSchema, Sample, View
from privrec.data.records import fmt
from privrec.data.samples import without_recent


class Texts:
    """The fixed sentences of the prompts, with the dataset's item noun (MovieLens: movie, watch)."""

    def __init__(self, schema: RecordSchema):
        n, ns, v = schema.noun, schema.plural, schema.verb
        self.tallrec_instruction = (
            "Given the user's preference and unpreference, identify whether the user will like the target "
            f'{n} by answering "Yes." or "No.".')
        self.kv_instruction = (
            f"Given the user's profile, rating history and a target {n}, identify whether the user will like the "
            f'target {n} by answering "Yes." or "No.".')
        self.kv_question = f"Will the user like the target {n}?"
        self.tallrec_target_line = f"Whether the user will like the target {n} "
        self.next_instruction = (
            f"Given the user's profile, rating history and a list of candidate {ns}, predict which candidate {n} "
            f"the user will {v} next. Answer with the title of the {n}.")
        self.next_question = f"Which candidate {n} will the user {v} next?"
        self.candidates_head = f"Candidate {ns}: "
        self.noun, self.plural = n, ns


_ML = Texts(MOVIELENS)
TALLREC_INSTRUCTION = _ML.tallrec_instruction
KV_INSTRUCTION = _ML.kv_instruction
KV_QUESTION = _ML.kv_question
ANSWERS = ("Yes", "No")
TALLREC_TARGET_LINE = _ML.tallrec_target_line
KV_NAMES = MOVIELENS.kv_names()
NEXT_INSTRUCTION = _ML.next_instruction
NEXT_QUESTION = _ML.next_question
# the like-prompt's fields that depend on the target (the prefix/suffix cut falls before the first of them)
TARGET_FIELDS = MOVIELENS.target_keys()


def _quote(title: str) -> str:
    return f'"{title}"'


def _ratings(n: int) -> str:
    return f"{n} rating" if n == 1 else f"{n} ratings"


class PromptBuilder:
    """Renders samples with a :class:`privrec.config.PromptConfig` against one dataset's records.

    ``item_stats``: the counts ``prompt.item_stats`` reads (the run's training pool, computed by the caller
    from training labels only); required when that option is on. ``collab``: the
    :class:`privrec.features.CollabFeatures` whose predicted rating ``prompt.cf_score`` shows (METHODS §12).
    ``plain``: start with no counted line and no features; whoever renders sets them first (a federation's
    clients each render under features counted over their own samples).
    """

    def __init__(self, dataset: Dataset, cfg, like_threshold: float = 3.0, item_stats: ItemStats | None = None,
                 collab=None, plain: bool = False):
        if getattr(cfg, "item_stats", False) and item_stats is None and not plain:
            raise ValueError("prompt.item_stats is on but no item statistics were given to the prompt builder")
        if getattr(cfg, "cf_score", False) and collab is None and not plain:
            raise ValueError("prompt.cf_score is on but no collaborative features were given to the prompt builder")
        self.ds = dataset
        self.schema: RecordSchema = dataset.schema
        self.texts = Texts(self.schema)
        self.kv_names = self.schema.kv_names()
        self.cfg = cfg
        self.like_threshold = like_threshold
        self.item_stats = item_stats
        self.collab = collab
        self.plain = plain  # render no counted line (the partition of shard training reads prompts so)

    # --- the optional counter lines ------------------------------------------------------------------
    def _shows(self, key: str) -> bool:
        """Whether prompts show the counted line ``key`` (``item_stats``, ``cf_score``) now."""
        return bool(getattr(self.cfg, key, False)) and not self.plain

    def _n_liked(self, history) -> int:
        return sum(r > self.like_threshold for _, r in history)

    def _stat(self, s: Sample) -> tuple[int, int]:
        """(like-rate in whole percent, count) of the target item among the other counted samples."""
        assert self.item_stats is not None
        rate, n = self.item_stats.read(s)
        return round(100 * rate), n

    def _counted(self, history):
        """The history items the summary counts: all, or all but the ``prompt.summary_skip_recent`` latest
        (so that a user's consecutive samples, whose windows hold each other's labels, do not count them); a
        history too short to leave anything is counted whole."""
        return without_recent(history, self.cfg.summary_skip_recent)

    def summary_sentence(self, history) -> str:
        counted = self._counted(history)
        if len(counted) == len(history):
            return f"The user liked {self._n_liked(counted)} of these {len(history)} {self.texts.plural}."
        return (f"The user liked {self._n_liked(counted)} of the {len(counted)} earliest of these "
                f"{self.texts.plural}.")

    def stats_sentence(self, s: Sample) -> str:
        pct, n = self._stat(s)
        if n == 0:
            return f"No other user has rated the target {self.texts.noun} yet."
        return f"Other users liked the target {self.texts.noun} {pct}% of the time ({_ratings(n)})."

    def _cf_rating(self, s: Sample) -> float:
        """The MF's predicted rating of the target (cross-fitted for a counted sample), on the 1 to
        ``rating_scale`` scale (MovieLens: 1-5)."""
        return min(self.schema.rating_scale, max(1.0, self.collab.predict(s)))

    def cf_sentence(self, s: Sample) -> str:
        return (f"A rating model of other users' ratings predicts {self._cf_rating(s):.1f} of "
                f"{self.schema.rating_scale:g} stars for the "
                f"target {self.texts.noun}.")

    def _summary_value(self, history) -> str:
        counted = self._counted(history)
        if len(counted) == len(history):
            return f"{self._n_liked(counted)} of {len(history)} liked"
        return f"{self._n_liked(counted)} of the earliest {len(counted)} liked"

    def _stats_value(self, s: Sample) -> str:
        pct, n = self._stat(s)
        return f"unknown ({_ratings(n)})" if n == 0 else f"{pct}% ({_ratings(n)})"

    # --- the instruction and input, before any chat formatting -------------------------------------------
    def _tallrec_lists(self, history) -> str:
        liked = [_quote(self.ds.items[i].title) for i, r in history if r > self.like_threshold]
        disliked = [_quote(self.ds.items[i].title) for i, r in history if r <= self.like_threshold]
        head = f"User Preference: {', '.join(liked)}\nUser Unpreference: {', '.join(disliked)}\n"
        if self.cfg.history_summary:
            head += self.summary_sentence(history) + "\n"
        return head

    def tallrec_input_parts(self, s: Sample) -> tuple[str, str]:
        """(the history lists [+ summary], [the item-stats line +] the target question)."""
        tail = f"{self.texts.tallrec_target_line}{_quote(self.ds.items[s.item_id].title)}?"
        if self._shows("cf_score"):
            tail = self.cf_sentence(s) + "\n" + tail
        if self._shows("item_stats"):
            tail = self.stats_sentence(s) + "\n" + tail
        return self._tallrec_lists(s.history), tail

    def tallrec_input(self, s: Sample) -> str:
        return "".join(self.tallrec_input_parts(s))

    def _history_entry(self, item_id: int, rating: float) -> str:
        it = self.ds.items[item_id]
        if self.cfg.rating_style == "rating":
            opinion = f"rated {rating:g}/{self.schema.rating_scale:g}"
        else:
            opinion = "liked" if rating > self.like_threshold else "disliked"
        parts = [self._titled(item_id), opinion]
        if self.cfg.history_genres:
            parts += [fmt(v) for v in (it.get(k) for k in self.schema.history_fields) if v]
        return "; ".join(parts)

    def _titled(self, item_id: int) -> str:
        """The quoted title, with the schema's ``title_suffix`` field in parentheses when it has a value."""
        it = self.ds.items[item_id]
        suffix = fmt(it.get(self.schema.title_suffix)) if self.schema.title_suffix else ""
        return f"{_quote(it.title)} ({suffix})" if suffix else _quote(it.title)

    def kv_fields(self, s: Sample) -> dict[str, str]:
        """Every key-value pair of METHODS §1 (user fields, history, target title and fields), in the
        template's order (+ the optional counter lines)."""
        item = self.ds.items[s.item_id]
        fields = self._user_fields(s.user_id)
        fields["history"] = self._history(s.history)
        if self.cfg.history_summary:
            fields["summary"] = self._summary_value(s.history)
        fields["title"] = _quote(item.title)
        fields.update({f.key: fmt(item.get(f.key)) for f in self.schema.item_fields})
        if self._shows("item_stats"):
            fields["item_stats"] = self._stats_value(s)
        if self._shows("cf_score"):
            fields["cf_score"] = f"{self._cf_rating(s):.1f} of {self.schema.rating_scale:g}"
        return fields

    def _user_fields(self, user_id: int) -> dict[str, str]:
        user = self.ds.users.get(user_id)
        if self.cfg.user_fields and user is not None:
            return {f.key: fmt(user.get(f.key)) for f in self.schema.user_fields}
        return {}

    def _history(self, history) -> str:
        return "\n" + "\n".join(f"- {self._history_entry(i, r)}" for i, r in history)

    def kv_input_parts(self, s: Sample) -> tuple[str, str]:
        """(lines before the first target field, the rest with the question): the input's prefix/suffix cut.

        The counter lines are not key-value pairs InstructMK shuffles or masks: the history summary always
        follows the history line, the item-stats line always ends the fields (both kept by every view)."""
        fields = self.kv_fields(s)
        order = self._with_counters(s.view.order or self.schema.kv_keys())
        lines = [(k, f"{self.kv_names[k]}: {fields[k]}") for k in order if k in fields and k not in s.view.dropped]
        targets = self.schema.target_keys()
        cut = next((i for i, (k, _) in enumerate(lines) if k in targets), len(lines))
        head = "".join(line + "\n" for _, line in lines[:cut])
        tail = "".join(line + "\n" for _, line in lines[cut:])
        return head, tail + self.texts.kv_question

    @staticmethod
    def _with_counters(order) -> list[str]:
        out = []
        for k in order:
            out.append(k)
            if k == "history":
                out.append("summary")
        return out + ["item_stats", "cf_score"]

    def kv_input(self, s: Sample) -> str:
        return "".join(self.kv_input_parts(s))

    def input_parts(self, s: Sample) -> tuple[str, str, str]:
        """(instruction, input prefix, input suffix) of the like-prompt."""
        if self.cfg.template == "tallrec":
            return (self.texts.tallrec_instruction, *self.tallrec_input_parts(s))
        return (self.texts.kv_instruction, *self.kv_input_parts(s))

    def parts(self, s: Sample) -> tuple[str, str]:
        instruction, head, tail = self.input_parts(s)
        return instruction, head + tail

    # --- the full prompt -----------------------------------------------------------------------------
    def _wrap(self, instruction: str, head: str, tail: str, tokenizer) -> tuple[str, str]:
        """The prompt of ``instruction`` and the input ``head + tail`` (through the chat template when the
        tokenizer has one), cut where ``tail`` starts."""
        inp = head + tail
        if self.cfg.chat_template and getattr(tokenizer, "chat_template", None):
            msgs = []
            if self.cfg.system_prompt is not None:
                msgs.append({"role": "system", "content": self.cfg.system_prompt})
            msgs.append({"role": "user", "content": f"{instruction}\n\n{inp}"})
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        else:
            text = f"### Instruction:\n{instruction}\n\n### Input:\n{inp}\n\n### Response:\n"
        at = text.rfind(inp)  # the input is the last thing the template writes before its closing tags
        if at < 0:
            raise ValueError("the chat template rewrites the message content; cannot cut the prompt")
        cut = at + len(head)
        # The prefix ends on a non-space character: the whitespace before the first target field goes to the
        # suffix. Byte-level BPE pre-tokenisers never join a non-space character to the whitespace after it,
        # but they do merge whitespace runs by what follows, so this cut leaves ids(prefix) + ids(suffix) equal
        # to ids(prefix + suffix) (checked for SmolLM2's tokenizer in tests/test_ranking.py).
        while cut > 0 and text[cut - 1].isspace():
            cut -= 1
        return text[:cut], text[cut:]

    def split(self, s: Sample, tokenizer) -> tuple[str, str]:
        """The like-prompt as (prefix, suffix): the prefix holds everything before the first target-item
        field (the same for every candidate of a user), the suffix the rest through the assistant header."""
        instruction, head, tail = self.input_parts(s)
        return self._wrap(instruction, head, tail, tokenizer)

    def text(self, s: Sample, tokenizer) -> str:
        return "".join(self.split(s, tokenizer))

    # --- next-item prompt (BIGRec-style title likelihood) --------------------------------------------
    def _candidate_entry(self, item_id: int) -> str:
        return self._titled(item_id)

    def next_item_input(self, user_id: int, history, candidates, view: View | None = None) -> str:
        """Input of the next-item prompt: the user's fields and history and the candidate list (in the given
        order), as key-value lines (``kv``) or TALLRec's liked/disliked lists (``tallrec``)."""
        cands = "\n" + "\n".join(f"- {self._candidate_entry(i)}" for i in candidates)
        if self.cfg.template == "tallrec":
            return f"{self._tallrec_lists(history)}{self.texts.candidates_head}{cands}\n{self.texts.next_question}"
        view = view or View()
        fields = self._user_fields(user_id)
        fields.update(history=self._history(history), candidates=cands)
        if self.cfg.history_summary:
            fields["summary"] = self._summary_value(history)
        # the candidate list stands where the like-prompt's target fields stand (after the history by default)
        order = ["candidates" if k == "title" else k
                 for k in self._with_counters(view.order or self.schema.kv_keys())]
        return "".join(f"{self.kv_names[k]}: {fields[k]}\n" for k in order
                       if k in fields and k not in view.dropped) + self.texts.next_question

    def next_item_prompt(self, user_id: int, history, candidates, tokenizer, view: View | None = None) -> str:
        """The whole next-item prompt through the assistant header (shared by all candidates: the suffix of
        a candidate is its answer, :meth:`item_answer`)."""
        prefix, suffix = self._wrap(self.texts.next_instruction, "", self.next_item_input(user_id, history, candidates,
                                                                                view), tokenizer)
        return prefix + suffix

    def item_answer(self, item_id: int) -> str:
        """What the model should say for a candidate: its title, as in the candidate list (without quotes)."""
        return self.ds.items[item_id].title


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
