"""Dataset row formats -> normalised SFT and DPO rows.

Normalised rows (what the training stages consume; TRL's conversational formats):
    SFT: {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
         an optional system turn first, then user/assistant turns alternating, the last one assistant.
    DPO: {"prompt": [messages ending with a user turn], "chosen": [one assistant message],
          "rejected": [one assistant message]}

`FORMATS` is the one table of adapters: name -> kind ("sft" | "dpo"), the keys a row must have for
auto-detection, and a converter `row -> normalised row`. Converters raise `RowError` naming the
field; the loader adds the file and row number (`data/x.jsonl row 17: field 'output' must be ...`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from upstack.errors import DataError

ROLES = ("system", "user", "assistant")
# ShareGPT speaker names (LLaMA-Factory, FastChat, SlimOrca) -> roles.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "system": "system"}


class RowError(DataError):
    """One row is malformed. `field` names the offending field; the loader prefixes file and row."""

    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(f"field '{field}' {problem}")


def json_type(value: Any) -> str:
    """The JSON name of a value's type, for messages: null, boolean, number, string, list, object."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


# ---------------------------------------------------------------------------------------------
# Field checks

def _get(row: dict, key: str) -> Any:
    if key not in row:
        raise RowError(key, "is missing")
    return row[key]


def _text(row: dict, key: str, *, allow_empty: bool = False) -> str:
    value = _get(row, key)
    if not isinstance(value, str):
        raise RowError(key, f"must be a string, got {json_type(value)}")
    if not allow_empty and not value.strip():
        raise RowError(key, "must not be empty")
    return value


def _optional_text(row: dict, key: str) -> str:
    """A string field that may be absent, null or empty (-> "")."""
    value = row.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowError(key, f"must be a string, got {json_type(value)}")
    return value


def _message(value: Any, field: str) -> dict:
    """One {role, content} or ShareGPT {from, value} object -> {"role", "content"}."""
    if not isinstance(value, dict):
        raise RowError(field, f"must be an object with 'role' and 'content', got {json_type(value)}")
    if "from" in value and "role" not in value:  # ShareGPT style
        role_key, content_key, names = "from", "value", SHAREGPT_ROLES
    else:
        role_key, content_key, names = "role", "content", {r: r for r in ROLES}
    role = _get_nested(value, role_key, field)
    if not isinstance(role, str) or role.lower() not in names:
        allowed = ", ".join(sorted(set(names)))
        raise RowError(f"{field}.{role_key}", f"must be one of {allowed}, got {role!r}")
    content = _get_nested(value, content_key, field)
    if not isinstance(content, str):
        raise RowError(f"{field}.{content_key}", f"must be a string, got {json_type(content)}")
    return {"role": names[role.lower()], "content": content, "_key": content_key}


def _get_nested(obj: dict, key: str, field: str) -> Any:
    if key not in obj:
        raise RowError(f"{field}.{key}", "is missing")
    return obj[key]


def _messages(value: Any, field: str) -> list[dict]:
    """A list of messages (role/content or ShareGPT from/value) -> [{"role", "content"}, ...].

    Messages carry a private "_key" (content field name) so turn checks can name the raw field;
    `_clean` drops it before a row leaves this module."""
    if not isinstance(value, list):
        raise RowError(field, f"must be a list of messages, got {json_type(value)}")
    if not value:
        raise RowError(field, "must not be an empty list")
    return [_message(m, f"{field}[{i}]") for i, m in enumerate(value)]


def _check_turns(msgs: list[dict], field: str, *, first: str, last: str, system: bool = True) -> None:
    """Roles alternate user/assistant starting with `first` and ending with `last`, after an optional
    leading system turn; user and assistant turns are not empty."""
    start = 1 if system and msgs and msgs[0]["role"] == "system" else 0
    if start == len(msgs):
        raise RowError(field, "has no user or assistant turn")
    expected = first
    for i in range(start, len(msgs)):
        role = msgs[i]["role"]
        if role != expected:
            where = "is only allowed as the first turn" if role == "system" else f"where '{expected}' was expected"
            raise RowError(f"{field}[{i}]", f"has role '{role}' {where} (turns must alternate user/assistant"
                                            " after an optional system turn)")
        if not msgs[i]["content"].strip():
            raise RowError(f"{field}[{i}].{msgs[i].get('_key', 'content')}", "must not be empty")
        expected = "assistant" if role == "user" else "user"
    if msgs[-1]["role"] != last:
        raise RowError(field, f"must end with a{'n' if last == 'assistant' else ''} {last} turn,"
                              f" but its last turn is '{msgs[-1]['role']}'")


def _clean(msgs: list[dict]) -> list[dict]:
    """Drop private keys and empty system turns."""
    return [{"role": m["role"], "content": m["content"]} for m in msgs
            if not (m["role"] == "system" and not m["content"].strip())]


def _with_system(system: str, msgs: list[dict]) -> list[dict]:
    return ([{"role": "system", "content": system}] if system.strip() else []) + msgs


def _user(content: str) -> dict:
    return {"role": "user", "content": content}


def _assistant(content: str) -> dict:
    return {"role": "assistant", "content": content}


def _sft(msgs: list[dict]) -> dict:
    return {"messages": _clean(msgs)}


def _dpo(prompt: list[dict], chosen: list[dict], rejected: list[dict]) -> dict:
    if [m["content"] for m in chosen] == [m["content"] for m in rejected]:
        raise RowError("rejected", "is identical to 'chosen' (a preference pair needs two different answers)")
    return {"prompt": _clean(prompt), "chosen": _clean(chosen), "rejected": _clean(rejected)}


# ---------------------------------------------------------------------------------------------
# SFT adapters

def convert_alpaca(row: dict) -> dict:
    """instruction, input (optional), output; LLaMA-Factory's optional system and history too."""
    instruction = _text(row, "instruction")
    extra = _optional_text(row, "input")
    output = _text(row, "output")
    user = instruction if not extra.strip() else f"{instruction}\n\n{extra}"
    msgs = []
    history = row.get("history") or []
    if not isinstance(history, list):
        raise RowError("history", f"must be a list of [instruction, response] pairs, got {json_type(history)}")
    for i, pair in enumerate(history):
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(p, str) and p.strip() for p in pair)):
            raise RowError(f"history[{i}]", "must be a pair of non-empty strings [instruction, response]")
        msgs += [_user(pair[0]), _assistant(pair[1])]
    return _sft(_with_system(_optional_text(row, "system"), msgs + [_user(user), _assistant(output)]))


def convert_openorca(row: dict) -> dict:
    """OpenOrca / SlimOrca flat rows: system_prompt (may be empty), question, response."""
    system = _optional_text(row, "system_prompt")
    return _sft(_with_system(system, [_user(_text(row, "question")), _assistant(_text(row, "response"))]))


def convert_metamath(row: dict) -> dict:
    """MetaMathQA: query, response (type and original_question are ignored)."""
    return _sft([_user(_text(row, "query")), _assistant(_text(row, "response"))])


def convert_gsm8k(row: dict) -> dict:
    """GSM8K: question, answer (kept verbatim: the <<calc>> annotations and the final '#### N')."""
    return _sft([_user(_text(row, "question")), _assistant(_text(row, "answer"))])


def convert_messages(row: dict) -> dict:
    """messages: [{role, content}, ...] (UltraChat, UltraFeedback 'messages', TRL conversational)."""
    msgs = _messages(_get(row, "messages"), "messages")
    _check_turns(msgs, "messages", first="user", last="assistant")
    return _sft(msgs)


def convert_sharegpt(row: dict) -> dict:
    """conversations: [{from: system|human|gpt, value}, ...] and an optional top-level system."""
    msgs = _messages(_get(row, "conversations"), "conversations")
    _check_turns(msgs, "conversations", first="user", last="assistant")
    system = _optional_text(row, "system")
    if system.strip() and msgs[0]["role"] == "system":
        raise RowError("system", "is given but 'conversations' also starts with a system turn")
    return _sft(_with_system(system, msgs))


def convert_prompt_completion(row: dict) -> dict:
    """prompt, completion: strings, or message lists (prompt ending with user, completion starting
    with assistant)."""
    prompt = _prompt_messages(row, "prompt")
    completion = _completion_messages(row, "completion", single=False)
    return _sft(prompt + completion)


def _prompt_messages(row: dict, key: str) -> list[dict]:
    value = _get(row, key)
    if isinstance(value, str):
        return [_user(_text(row, key))]
    if isinstance(value, list):
        msgs = _messages(value, key)
        _check_turns(msgs, key, first="user", last="user")
        return msgs
    raise RowError(key, f"must be a string or a list of messages, got {json_type(value)}")


def _completion_messages(row: dict, key: str, *, single: bool) -> list[dict]:
    """A string, one message object, or a message list starting (and ending) with an assistant turn."""
    value = _get(row, key)
    if isinstance(value, str):
        return [_assistant(_text(row, key))]
    if isinstance(value, dict):  # one message object, e.g. {"from": "gpt", "value": "..."}
        msg = _message(value, key)
        _check_reply(msg, key)
        return [msg]
    if not isinstance(value, list):
        raise RowError(key, f"must be a string or a list of messages, got {json_type(value)}")
    msgs = _messages(value, key)
    if single and len(msgs) != 1:
        raise RowError(key, f"must be one assistant message, got {len(msgs)} messages")
    _check_turns(msgs, key, first="assistant", last="assistant", system=False)
    return msgs


def _check_reply(msg: dict, field: str) -> None:
    if msg["role"] != "assistant":
        key = "from" if msg["_key"] == "value" else "role"
        raise RowError(f"{field}.{key}", f"must be an assistant turn, got '{msg['role']}'")
    if not msg["content"].strip():
        raise RowError(f"{field}.{msg['_key']}", "must not be empty")


# ---------------------------------------------------------------------------------------------
# DPO adapters

def convert_preference(row: dict) -> dict:
    """prompt, chosen, rejected: strings or message lists. When chosen/rejected are whole
    conversations that include the prompt (UltraFeedback-binarized, TRL implicit prompt), the shared
    leading messages up to the last shared user turn become the prompt; `prompt` may then be absent."""
    chosen_raw, rejected_raw = _get(row, "chosen"), _get(row, "rejected")
    if isinstance(chosen_raw, list) and chosen_raw and _message(chosen_raw[0], "chosen[0]")["role"] != "assistant":
        if not isinstance(rejected_raw, list):
            raise RowError("rejected", f"must be a list of messages like 'chosen', got {json_type(rejected_raw)}")
        return _split_conversations(_messages(chosen_raw, "chosen"), _messages(rejected_raw, "rejected"))
    if "prompt" not in row:
        raise RowError("prompt", "is missing (needed unless chosen and rejected are full conversations)")
    prompt = _prompt_messages(row, "prompt")
    chosen = _completion_messages(row, "chosen", single=True)
    rejected = _completion_messages(row, "rejected", single=True)
    return _dpo(prompt, chosen, rejected)


def _split_conversations(chosen: list[dict], rejected: list[dict]) -> dict:
    """Shared leading turns (cut back to end at a user turn) -> prompt; the rest -> chosen/rejected."""
    same = 0
    while (same < min(len(chosen), len(rejected))
           and (chosen[same]["role"], chosen[same]["content"]) == (rejected[same]["role"], rejected[same]["content"])):
        same += 1
    cut = same
    while cut > 0 and chosen[cut - 1]["role"] != "user":
        cut -= 1
    if cut == 0:
        raise RowError("rejected", "shares no prompt with 'chosen' (no common leading turns ending with a user turn)")
    prompt = chosen[:cut]
    _check_turns(prompt, "chosen", first="user", last="user")
    for name, msgs in (("chosen", chosen), ("rejected", rejected)):
        if len(msgs) - cut != 1:
            raise RowError(name, f"must continue the shared prompt with exactly one assistant turn,"
                                 f" got {len(msgs) - cut} turns after it")
        _check_reply(msgs[cut], f"{name}[{cut}]")
    return _dpo(prompt, chosen[cut:], rejected[cut:])


def convert_orca_dpo(row: dict) -> dict:
    """Intel/orca_dpo_pairs: system (may be empty), question, chosen, rejected (strings)."""
    prompt = _with_system(_optional_text(row, "system"), [_user(_text(row, "question"))])
    return _dpo(prompt, [_assistant(_text(row, "chosen"))], [_assistant(_text(row, "rejected"))])


_HH_MARK = re.compile(r"\n\n(Human|Assistant):")
_HH_ASSISTANT = "\n\nAssistant:"


def _hh_turns(text: str, field: str) -> list[dict]:
    parts = _HH_MARK.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise RowError(field, "must be a transcript of '\\n\\nHuman: ...' and '\\n\\nAssistant: ...' turns")
    return [{"role": "user" if who == "Human" else "assistant", "content": said.strip()}
            for who, said in zip(parts[1::2], parts[2::2])]


def convert_hh_rlhf(row: dict) -> dict:
    """Anthropic HH-RLHF: chosen and rejected are whole transcripts; the longest shared prefix that
    ends at '\\n\\nAssistant:' is the prompt, the rest of each is its answer."""
    for key in ("chosen", "rejected"):
        value = _get(row, key)
        if isinstance(value, list):
            raise RowError(key, "must be a string (an HH-RLHF transcript), got list;"
                                " for message lists pass format=preference")
    chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
    if chosen == rejected:
        raise RowError("rejected", "is identical to 'chosen' (a preference pair needs two different answers)")
    same = 0
    limit = min(len(chosen), len(rejected))
    while same < limit and chosen[same] == rejected[same]:
        same += 1
    cut = chosen.rfind(_HH_ASSISTANT, 0, same)
    if cut < 0:
        raise RowError("rejected", "shares no prompt with 'chosen' ending at '\\n\\nAssistant:'")
    prompt = _hh_turns(chosen[:cut], "chosen")
    _check_turns(prompt, "chosen", first="user", last="user", system=False)
    replies = []
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        turns = _hh_turns(text[cut:], key)
        if len(turns) != 1:
            raise RowError(key, f"must end with one Assistant reply after the shared prompt, got {len(turns)} turns")
        if not turns[0]["content"]:
            raise RowError(key, "has an empty final Assistant reply")
        replies.append(turns)
    return _dpo(prompt, replies[0], replies[1])


def convert_sharegpt_ranking(row: dict) -> dict:
    """LLaMA-Factory ranking rows: conversations [{from, value}] ending with a human turn, chosen and
    rejected {from: gpt, value}; an optional top-level system."""
    prompt = _messages(_get(row, "conversations"), "conversations")
    _check_turns(prompt, "conversations", first="user", last="user")
    system = _optional_text(row, "system")
    if system.strip() and prompt[0]["role"] == "system":
        raise RowError("system", "is given but 'conversations' also starts with a system turn")
    chosen = _completion_messages(row, "chosen", single=True)
    rejected = _completion_messages(row, "rejected", single=True)
    return _dpo(_with_system(system, prompt), chosen, rejected)


# ---------------------------------------------------------------------------------------------
# The table

@dataclass(frozen=True)
class Format:
    name: str
    kind: str                      # "sft" or "dpo"
    keys: tuple[str, ...]          # a row with all these keys is auto-detected as this format
    convert: Callable[[dict], dict]


FORMATS: dict[str, Format] = {f.name: f for f in [
    Format("alpaca", "sft", ("instruction", "output"), convert_alpaca),
    Format("openorca", "sft", ("system_prompt", "question", "response"), convert_openorca),
    Format("metamath", "sft", ("query", "response"), convert_metamath),
    Format("gsm8k", "sft", ("question", "answer"), convert_gsm8k),
    Format("messages", "sft", ("messages",), convert_messages),
    Format("sharegpt", "sft", ("conversations",), convert_sharegpt),
    Format("prompt_completion", "sft", ("prompt", "completion"), convert_prompt_completion),
    Format("preference", "dpo", ("prompt", "chosen", "rejected"), convert_preference),
    Format("orca_dpo", "dpo", ("system", "question", "chosen", "rejected"), convert_orca_dpo),
    Format("hh_rlhf", "dpo", ("chosen", "rejected"), convert_hh_rlhf),
    Format("sharegpt_ranking", "dpo", ("conversations", "chosen", "rejected"), convert_sharegpt_ranking),
]}

KINDS = {"sft": "SFT", "dpo": "DPO"}


def formats_of(kind: str) -> list[Format]:
    return [f for f in FORMATS.values() if f.kind == kind]


def _known(kind: str) -> str:
    return "; ".join(f"{f.name} ({', '.join(f.keys)})" for f in formats_of(kind))


def check_format(name: str, kind: str, source: str) -> Format:
    """The adapter `name` for a `kind` stage, or a DataError saying which formats that stage takes."""
    fmt = FORMATS.get(name)
    if fmt is None or fmt.kind != kind:
        what = f"is a {KINDS[fmt.kind]} format" if fmt else "is not a known format"
        raise DataError(f"{source}: format {name!r} {what}; {KINDS[kind]} formats: {_known(kind)}")
    return fmt


def detect_row_format(row: dict, kind: str, source: str) -> str:
    """The one `kind` format whose required keys the row has. A format whose keys are a strict subset
    of another match loses to it (orca_dpo's system+question+chosen+rejected beats hh_rlhf's
    chosen+rejected). None or several left: DataError listing formats, asking for format=."""
    have = set(row)
    matches = [f for f in formats_of(kind) if set(f.keys) <= have]
    matches = [f for f in matches if not any(set(f.keys) < set(g.keys) for g in matches)]
    if len(matches) == 1:
        return matches[0].name
    keys = ", ".join(map(str, row)) or "none"
    if not matches:
        raise DataError(f"{source}: cannot tell the format from the first row's keys ({keys}); known"
                        f" {KINDS[kind]} formats: {_known(kind)}; pass format=NAME (e.g. {source}:format="
                        f"{formats_of(kind)[0].name})")
    names = ", ".join(f.name for f in matches)
    raise DataError(f"{source}: the first row's keys ({keys}) match several {KINDS[kind]} formats ({names});"
                    f" pass format=NAME to choose one")


def convert_row(row: dict, fmt: str) -> dict:
    """Convert one raw row with the named adapter (raises RowError)."""
    if not isinstance(row, dict):
        raise DataError(f"must be a JSON object, got {json_type(row)}")
    return FORMATS[fmt].convert(row)
