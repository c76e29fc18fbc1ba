"""Renaming state-dict keys between our names and another code base's, by an ordered table of rules.

A rule pairs two key templates, ours and theirs. In a template, `{name}` stands for a number,
`{name+3}` / `{name-1}` for that number shifted on this side, and a trailing `*` for the rest of
the key; everything else is literal. The first rule that matches a key renames it, in either
direction, so one table serves both ways. Renaming is checked: every key must match a rule, and
no two keys may land on the same name.
"""
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor

from ..errors import InputError

StateDict = dict[str, Tensor]

_FIELD = re.compile(r"\{(\w+)([+-]\d+)?\}")


@dataclass(frozen=True)
class _Template:
    pattern: re.Pattern
    offsets: dict[str, int]
    text: str

    @classmethod
    def parse(cls, text: str) -> "_Template":
        regex, offsets, position = "", {}, 0
        body = text.removesuffix("*")
        for found in _FIELD.finditer(body):
            regex += re.escape(body[position:found.start()]) + rf"(?P<{found[1]}>\d+)"
            offsets[found[1]] = int(found[2] or 0)
            position = found.end()
        regex += re.escape(body[position:]) + ("(?P<rest>.*)" if text.endswith("*") else "")
        return cls(re.compile(regex), offsets, text)

    def read(self, key: str) -> dict[str, int | str] | None:
        """The canonical field values of `key`, or None if it does not match."""
        found = self.pattern.fullmatch(key)
        if found is None:
            return None
        values: dict[str, int | str] = {name: int(found[name]) - offset for name, offset in self.offsets.items()}
        if "rest" in self.pattern.groupindex:
            values["rest"] = found["rest"]
        return values

    def write(self, values: dict[str, int | str]) -> str | None:
        """The key of these field values, or None where a shifted number would be negative."""
        numbers = {name: int(values[name]) + offset for name, offset in self.offsets.items()}
        if any(number < 0 for number in numbers.values()):
            return None
        key = _FIELD.sub(lambda found: str(numbers[found[1]]), self.text.removesuffix("*"))
        return key + str(values["rest"]) if self.text.endswith("*") else key


class RuleTable:
    """An ordered list of (ours, theirs) template pairs with the same fields on both sides."""

    def __init__(self, pairs: Sequence[tuple[str, str]]) -> None:
        self.rules = []
        for ours, theirs in pairs:
            templates = _Template.parse(ours), _Template.parse(theirs)
            if len({(frozenset(t.offsets), t.text.endswith("*")) for t in templates}) != 1:
                raise ValueError(f"rule {ours!r} <-> {theirs!r}: both sides need the same fields")
            self.rules.append(templates)

    def rename_key(self, key: str, to_ours: bool) -> str | None:
        """The key's name on the other side, by the first rule that matches; None if none does."""
        for ours, theirs in self.rules:
            source, target = (theirs, ours) if to_ours else (ours, theirs)
            values = source.read(key)
            # A rule whose shifted numbers would turn negative does not apply; later rules may.
            if values is not None and (new_key := target.write(values)) is not None:
                return new_key
        return None

    def rename(self, state_dict: Mapping[str, Tensor], to_ours: bool, source: str) -> StateDict:
        """Rename every key; `source` names the input in errors.

        Raises InputError naming the keys no rule matches and any two keys renamed to the same name.
        """
        renamed: StateDict = {}
        origin: dict[str, str] = {}
        unmapped, collisions = [], []
        for key, value in state_dict.items():
            new_key = self.rename_key(key, to_ours)
            if new_key is None:
                unmapped.append(key)
            elif new_key in origin:
                collisions.append(f"{origin[new_key]} and {key} both become {new_key}")
            else:
                origin[new_key] = key
                renamed[new_key] = value
        problems = []
        if unmapped:
            more = f" and {len(unmapped) - 8} more" if len(unmapped) > 8 else ""
            problems.append(f"no rule maps {', '.join(unmapped[:8])}{more}")
        problems += collisions
        if problems:
            raise InputError(f"{source}: " + "; ".join(problems) + "; is it really in this format?")
        return renamed
