"""Every string field of every request, checked once before any work (SPEC §4).

The guard (server.api.interceptors) calls `check_request` for each call after authentication and
before the handler. The fields to check are read from the request's protobuf descriptor, once per
message type, so a field added to the proto is checked from its first day with the rule
`validation.text_rule` gives it (a named rule, or the default one).
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from server.domain import validation
from server.domain.validation import TextKind, TextRule


@dataclass(frozen=True, slots=True)
class _StringField:
    name: str
    rule: TextRule
    repeated: bool
    identifier: bool  # rule.kind is IDENTIFIER (read on every call)
    max_chars: int  # rule.max_chars


@dataclass(frozen=True, slots=True)
class _MessageField:
    name: str
    repeated: bool
    plan: _Plan


@dataclass(frozen=True, slots=True)
class _Plan:
    strings: tuple[_StringField, ...]
    messages: tuple[_MessageField, ...]


_PLANS: dict[str, _Plan] = {}
_PLANS_BY_TYPE: dict[type, _Plan] = {}


def _is_repeated(field: FieldDescriptor) -> bool:
    return field.is_repeated if hasattr(field, "is_repeated") else field.label == FieldDescriptor.LABEL_REPEATED


def _plan(descriptor: Descriptor) -> _Plan:
    plan = _PLANS.get(descriptor.full_name)
    if plan is not None:
        return plan
    _PLANS[descriptor.full_name] = _Plan((), ())  # a message that contains itself stops here
    strings, messages = [], []
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_STRING:
            rule = validation.text_rule(descriptor.name, field.name)
            strings.append(_StringField(field.name, rule, _is_repeated(field), rule.kind is TextKind.IDENTIFIER,
                                        rule.max_chars))
        elif field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.full_name.startswith("cobalt."):
            nested = _plan(field.message_type)
            if nested.strings or nested.messages:
                messages.append(_MessageField(field.name, _is_repeated(field), nested))
    plan = _Plan(tuple(strings), tuple(messages))
    _PLANS[descriptor.full_name] = plan
    return plan


def string_fields(descriptor: Descriptor, prefix: str = "") -> list[tuple[str, TextRule, bool]]:
    """(path, rule, repeated) of every string field checked in a message of this type (for tests and docs)."""
    plan = _plan(descriptor)
    found = [(prefix + f.name, f.rule, f.repeated) for f in plan.strings]
    for m in plan.messages:
        found += string_fields(descriptor.fields_by_name[m.name].message_type, f"{prefix}{m.name}.")
    return found


def check_request(request: Message) -> None:
    """Raise InvalidArgument with a field violation for the first string field that breaks its rule."""
    plan = _PLANS_BY_TYPE.get(type(request))
    if plan is None:
        plan = _PLANS_BY_TYPE[type(request)] = _plan(request.DESCRIPTOR)
    _check(request, plan, "")


def _check(msg: Message, plan: _Plan, prefix: str) -> None:
    for f in plan.strings:
        if f.repeated:
            for i, value in enumerate(getattr(msg, f.name)):
                validation.check_text(f"{prefix}{f.name}[{i}]", value, f.rule)
            continue
        value = getattr(msg, f.name)
        if not value:
            if f.rule.required:
                validation.check_text(prefix + f.name, value, f.rule)
            continue
        # the common case, in a few C calls: printable text (no character any rule refuses),
        # within the limit, and for an identifier not all spaces
        if value.isprintable() and len(value) <= f.max_chars and not (f.identifier and value.isspace()):
            continue
        validation.check_text(prefix + f.name, value, f.rule)  # the rule in full; raises with the reason
    for m in plan.messages:
        if m.repeated:
            for i, item in enumerate(getattr(msg, m.name)):
                _check(item, m.plan, f"{prefix}{m.name}[{i}].")
        elif msg.HasField(m.name):
            _check(getattr(msg, m.name), m.plan, f"{prefix}{m.name}.")
