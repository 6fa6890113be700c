"""Key-value records of users and items, and how a dataset shows them (METHODS §1: multiple key-value data).

An :class:`Item` is a title and its other fields in order; a :class:`User` its fields in order. A field's
value is a string or, for a list-valued field (MovieLens genres), a tuple of strings. A :class:`RecordSchema`
says what the prompts need to know about the keys: their display names, the noun for an item, which field
follows the title in parentheses (MovieLens: the year), which fields each history entry shows, which ones the
one-hot references read. MovieLens is :data:`MOVIELENS`; a table source builds its own from its schema file.

The prompt names a user field ``user {name}`` and an item field ``target {noun} {name}``.
"""

from __future__ import annotations

from dataclasses import dataclass

Value = str | tuple[str, ...]
# keys the prompts use for themselves; a schema's field may not take them
RESERVED_KEYS = frozenset({"history", "title", "candidates", "summary", "item_stats", "cf_score"})


class _Record:
    fields: tuple[tuple[str, Value], ...]

    def get(self, key: str, default: Value = "") -> Value:
        for k, v in self.fields:
            if k == key:
                return v
        return default

    def __getattr__(self, key: str) -> Value:  # ``user.occupation``, ``item.genres``: a field by its key
        if key.startswith("__") or key == "fields":
            raise AttributeError(key)
        for k, v in self.fields:
            if k == key:
                return v
        raise AttributeError(f"{type(self).__name__} has no field {key!r}")


@dataclass(frozen=True)
class Item(_Record):
    title: str
    fields: tuple[tuple[str, Value], ...] = ()  # (key, value) in the schema's order, the title excluded


@dataclass(frozen=True)
class User(_Record):
    fields: tuple[tuple[str, Value], ...] = ()


@dataclass(frozen=True)
class FieldInfo:
    key: str
    name: str  # display name in the prompt
    is_list: bool = False
    categorical: bool = True  # read by the one-hot references


@dataclass(frozen=True)
class RecordSchema:
    """What the prompts and references know about a dataset's keys."""

    noun: str = "movie"
    plural: str = "movies"
    verb: str = "watch"  # the next-item question: which candidate movie will the user watch next?
    user_fields: tuple[FieldInfo, ...] = ()
    item_fields: tuple[FieldInfo, ...] = ()  # the title excluded
    title_name: str = "title"
    title_suffix: str | None = None  # an item field shown in parentheses after the title
    history_fields: tuple[str, ...] = ()  # item fields each history entry shows (prompt.history_genres)
    rating_scale: float = 5.0

    def kv_keys(self) -> tuple[str, ...]:
        """Every key of the kv template in its order: user fields, history, title, item fields."""
        return (*(f.key for f in self.user_fields), "history", "title", *(f.key for f in self.item_fields))

    def kv_names(self) -> dict[str, str]:
        n = self.noun
        names = {f.key: f"user {f.name}" for f in self.user_fields}
        names.update({f.key: f"target {n} {f.name}" for f in self.item_fields})
        names.update({"history": "user history", "title": f"target {n} {self.title_name}",
                      "candidates": f"candidate {self.plural}", "summary": "user history likes",
                      "item_stats": f"target {n} like rate among other users",
                      "cf_score": f"target {n} rating predicted from other users' ratings"})
        return names

    def item_field(self, key: str) -> FieldInfo:
        return next(f for f in self.item_fields if f.key == key)

    def suffix(self, item: Item) -> str:
        """The ``title_suffix`` field's value of ``item`` ('' when the schema has none): what the service's
        ``year`` shows."""
        return fmt(item.get(self.title_suffix)) if self.title_suffix else ""

    def shown(self, item: Item) -> dict[str, str]:
        """The item's fields by display name, as the service and its page show them (the title and the
        ``title_suffix`` field apart; empty values left out): MovieLens ``{"genres": "Comedy, Drama"}``."""
        return {f.name: fmt(v) for f in self.item_fields
                if f.key != self.title_suffix and (v := item.get(f.key))}

    def target_keys(self) -> frozenset[str]:
        """The like-prompt's keys that depend on the target (the prefix/suffix cut falls before the first)."""
        return frozenset({"title", "item_stats", "cf_score", *(f.key for f in self.item_fields)})


MOVIELENS = RecordSchema(
    user_fields=(FieldInfo("gender", "gender"), FieldInfo("age", "age"), FieldInfo("occupation", "occupation")),
    item_fields=(FieldInfo("genres", "genres", is_list=True), FieldInfo("year", "year", categorical=False)),
    title_suffix="year", history_fields=("genres",))


def fmt(value: Value) -> str:
    """A field's value as the prompt shows it (a list joined by ', ')."""
    return ", ".join(value) if isinstance(value, tuple) else value
