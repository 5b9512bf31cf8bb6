"""Row adapters: every format's conversion, validation messages and auto-detection."""

import pytest

from upstack.data.formats import FORMATS, RowError, convert_row, formats_of
from upstack.data.formats import detect_row_format as detect_format
from upstack.errors import DataError


def sft(fmt, row):
    return convert_row(row, fmt)["messages"]


def dpo(fmt, row):
    return convert_row(row, fmt)


def user(c):
    return {"role": "user", "content": c}


def asst(c):
    return {"role": "assistant", "content": c}


def system(c):
    return {"role": "system", "content": c}


# --- SFT ------------------------------------------------------------------------------------------

def test_alpaca_with_and_without_input():
    assert sft("alpaca", {"instruction": "Add.", "input": "", "output": "3"}) == [user("Add."), asst("3")]
    assert sft("alpaca", {"instruction": "Add.", "input": "1 + 2", "output": "3"}) == [
        user("Add.\n\n1 + 2"), asst("3")]
    assert sft("alpaca", {"instruction": "Add.", "output": "3"}) == [user("Add."), asst("3")]  # input optional
    assert sft("alpaca", {"instruction": "Add.", "input": None, "output": "3"}) == [user("Add."), asst("3")]


def test_alpaca_llamafactory_system_and_history():
    row = {"instruction": "And 2+2?", "input": "", "output": "4", "system": "Be brief.",
           "history": [["1+1?", "2"]]}
    assert sft("alpaca", row) == [system("Be brief."), user("1+1?"), asst("2"), user("And 2+2?"), asst("4")]
    with pytest.raises(RowError, match=r"field 'history\[0\]' must be a pair"):
        sft("alpaca", {**row, "history": [["only one"]]})


@pytest.mark.parametrize("row, message", [
    ({"instruction": "x", "input": "", "output": None}, "field 'output' must be a string, got null"),
    ({"instruction": "x", "input": "", "output": 3}, "field 'output' must be a string, got number"),
    ({"instruction": "x", "input": "", "output": "  "}, "field 'output' must not be empty"),
    ({"instruction": "x", "input": ["a"], "output": "y"}, "field 'input' must be a string, got list"),
    ({"input": "", "output": "y"}, "field 'instruction' is missing"),
])
def test_alpaca_errors_name_the_field(row, message):
    with pytest.raises(RowError) as e:
        sft("alpaca", row)
    assert str(e.value) == message
    assert isinstance(e.value, DataError)


def test_openorca():
    row = {"id": "niv.242684", "system_prompt": "You are an AI assistant. Provide a detailed answer.",
           "question": "Translate to French: Hello", "response": "Bonjour"}
    assert sft("openorca", row) == [system(row["system_prompt"]), user("Translate to French: Hello"), asst("Bonjour")]
    assert sft("openorca", {**row, "system_prompt": ""}) == [user("Translate to French: Hello"), asst("Bonjour")]


def test_metamath_and_gsm8k():
    row = {"query": "What is 2+3?", "response": "2+3=5. The answer is: 5", "type": "GSM_AnsAug",
           "original_question": "What is 2+3?"}
    assert sft("metamath", row) == [user("What is 2+3?"), asst("2+3=5. The answer is: 5")]
    g = {"question": "Q?", "answer": "1+1 = <<1+1=2>>2\n#### 2"}
    assert sft("gsm8k", g) == [user("Q?"), asst("1+1 = <<1+1=2>>2\n#### 2")]  # kept verbatim


def test_messages_normalises_and_validates():
    row = {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "hi", "name": "x"},
                        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
                        {"role": "assistant", "content": "ciao"}]}
    # empty system turn dropped, extra keys dropped, multi-turn kept
    assert sft("messages", row) == [user("hi"), asst("hello"), user("bye"), asst("ciao")]
    with pytest.raises(RowError, match=r"field 'messages' must end with an assistant turn"):
        sft("messages", {"messages": [{"role": "user", "content": "hi"}]})
    with pytest.raises(RowError, match=r"field 'messages\[1\]' has role 'user' where 'assistant' was expected"):
        sft("messages", {"messages": [user("a"), user("b"), asst("c")]})
    with pytest.raises(RowError, match=r"field 'messages\[0\].role' must be one of assistant, system, user, got 'tool'"):
        sft("messages", {"messages": [{"role": "tool", "content": "x"}]})
    with pytest.raises(RowError, match=r"field 'messages\[1\].content' must be a string, got list"):
        sft("messages", {"messages": [user("a"), {"role": "assistant", "content": [{"type": "text"}]}]})
    with pytest.raises(RowError, match=r"field 'messages\[1\].content' must not be empty"):
        sft("messages", {"messages": [user("a"), asst(" ")]})
    with pytest.raises(RowError, match=r"field 'messages\[2\]' has role 'system' is only allowed as the first turn"):
        sft("messages", {"messages": [user("a"), asst("b"), system("c"), asst("d")]})
    with pytest.raises(RowError, match=r"field 'messages' must not be an empty list"):
        sft("messages", {"messages": []})


def test_sharegpt():
    row = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q1"},
                             {"from": "gpt", "value": "A1"}, {"from": "human", "value": "Q2"},
                             {"from": "gpt", "value": "A2"}]}
    assert sft("sharegpt", row) == [system("S"), user("Q1"), asst("A1"), user("Q2"), asst("A2")]
    top = {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}], "system": "S"}
    assert sft("sharegpt", top) == [system("S"), user("Q"), asst("A")]
    with pytest.raises(RowError, match=r"field 'conversations\[1\].value' must be a string, got null"):
        sft("sharegpt", {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": None}]})
    with pytest.raises(RowError, match=r"field 'conversations\[0\].from' must be one of"):
        sft("sharegpt", {"conversations": [{"from": "robot", "value": "Q"}]})


def test_prompt_completion_strings_and_lists():
    assert sft("prompt_completion", {"prompt": "2+2=", "completion": "4"}) == [user("2+2="), asst("4")]
    row = {"prompt": [system("S"), user("Q")], "completion": [asst("A")]}
    assert sft("prompt_completion", row) == [system("S"), user("Q"), asst("A")]
    with pytest.raises(RowError, match=r"field 'prompt' must end with a user turn"):
        sft("prompt_completion", {"prompt": [user("Q"), asst("A")], "completion": "x"})
    with pytest.raises(RowError, match=r"field 'completion\[0\]' has role 'user'"):
        sft("prompt_completion", {"prompt": "Q", "completion": [user("x")]})


# --- DPO ------------------------------------------------------------------------------------------

def test_preference_strings():
    row = {"prompt": "Q", "chosen": "good", "rejected": "bad"}
    assert dpo("preference", row) == {"prompt": [user("Q")], "chosen": [asst("good")], "rejected": [asst("bad")]}


def test_preference_ultrafeedback_full_conversations_strip_shared_prompt():
    # HuggingFaceH4/ultrafeedback_binarized style: chosen/rejected repeat the prompt turn.
    row = {"prompt": "Write a haiku about rain.", "prompt_id": "abc",
           "chosen": [user("Write a haiku about rain."), asst("Soft rain on the roof")],
           "rejected": [user("Write a haiku about rain."), asst("Rain is wet.")],
           "messages": [user("Write a haiku about rain."), asst("Soft rain on the roof")],
           "score_chosen": 8.0, "score_rejected": 4.0}
    assert dpo("preference", row) == {"prompt": [user("Write a haiku about rain.")],
                                      "chosen": [asst("Soft rain on the roof")], "rejected": [asst("Rain is wet.")]}
    # implicit prompt (no prompt key), multi-turn shared history, system turn
    conv = [system("S"), user("Q1"), asst("A1"), user("Q2")]
    out = dpo("preference", {"chosen": conv + [asst("good")], "rejected": conv + [asst("bad")]})
    assert out == {"prompt": conv, "chosen": [asst("good")], "rejected": [asst("bad")]}


def test_preference_message_lists_explicit_prompt_and_errors():
    row = {"prompt": [user("Q")], "chosen": [asst("good")], "rejected": [asst("bad")]}
    assert dpo("preference", row)["prompt"] == [user("Q")]
    with pytest.raises(RowError, match="field 'rejected' is identical to 'chosen'"):
        dpo("preference", {"prompt": "Q", "chosen": "same", "rejected": "same"})
    with pytest.raises(RowError, match="field 'rejected' shares no prompt with 'chosen'"):
        dpo("preference", {"chosen": [user("Q1"), asst("a")], "rejected": [user("Q2"), asst("b")]})
    with pytest.raises(RowError, match="field 'chosen' must continue the shared prompt with exactly one assistant turn"):
        dpo("preference", {"chosen": [user("Q"), asst("a"), user("more"), asst("c")], "rejected": [user("Q"), asst("b")]})
    with pytest.raises(RowError, match="field 'prompt' is missing"):
        dpo("preference", {"chosen": "a", "rejected": "b", "prompt_id": 1})


def test_orca_dpo():
    row = {"system": "", "question": "Q?", "chosen": "yes", "rejected": "no"}
    assert dpo("orca_dpo", row) == {"prompt": [user("Q?")], "chosen": [asst("yes")], "rejected": [asst("no")]}
    row["system"] = "You are an AI assistant."
    assert dpo("orca_dpo", row)["prompt"] == [system("You are an AI assistant."), user("Q?")]
    with pytest.raises(RowError, match="field 'rejected' must be a string, got null"):
        dpo("orca_dpo", {**row, "rejected": None})


def test_hh_rlhf_shared_prefix():
    base = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: tell me a joke"
    row = {"chosen": base + "\n\nAssistant: Why did the chicken cross the road?",
           "rejected": base + "\n\nAssistant: No."}
    assert dpo("hh_rlhf", row) == {
        "prompt": [user("hi"), asst("hello"), user("tell me a joke")],
        "chosen": [asst("Why did the chicken cross the road?")], "rejected": [asst("No.")]}
    # replies that share their first words: the prompt still ends at the last shared Assistant marker
    row = {"chosen": "\n\nHuman: q\n\nAssistant: I think yes", "rejected": "\n\nHuman: q\n\nAssistant: I think no"}
    assert dpo("hh_rlhf", row)["chosen"] == [asst("I think yes")]
    with pytest.raises(RowError, match="identical"):
        dpo("hh_rlhf", {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: b"})
    with pytest.raises(RowError, match="field 'rejected' has an empty final Assistant reply"):
        dpo("hh_rlhf", {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant:"})
    with pytest.raises(RowError, match="for message lists pass format=preference"):
        dpo("hh_rlhf", {"chosen": [user("a")], "rejected": [user("b")]})


def test_sharegpt_ranking():
    row = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"}],
           "chosen": {"from": "gpt", "value": "good"}, "rejected": {"from": "gpt", "value": "bad"}}
    assert dpo("sharegpt_ranking", row) == {"prompt": [system("S"), user("Q")], "chosen": [asst("good")],
                                            "rejected": [asst("bad")]}
    with pytest.raises(RowError, match="field 'chosen.from' must be an assistant turn, got 'user'"):
        dpo("sharegpt_ranking", {**row, "chosen": {"from": "human", "value": "x"}})
    with pytest.raises(RowError, match="field 'conversations' must end with a user turn"):
        dpo("sharegpt_ranking", {**row, "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]})


def test_non_object_row():
    with pytest.raises(DataError, match="must be a JSON object, got list"):
        convert_row([1, 2], "alpaca")


# --- detection ------------------------------------------------------------------------------------

@pytest.mark.parametrize("keys, kind, expected", [
    (["instruction", "input", "output"], "sft", "alpaca"),
    (["id", "system_prompt", "question", "response"], "sft", "openorca"),
    (["query", "response", "type", "original_question"], "sft", "metamath"),
    (["question", "answer"], "sft", "gsm8k"),
    (["messages"], "sft", "messages"),
    (["prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen", "score_rejected"], "sft", "messages"),
    (["conversations"], "sft", "sharegpt"),
    (["prompt", "completion"], "sft", "prompt_completion"),
    (["prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen", "score_rejected"], "dpo", "preference"),
    (["system", "question", "chosen", "rejected"], "dpo", "orca_dpo"),
    (["chosen", "rejected"], "dpo", "hh_rlhf"),
    (["conversations", "chosen", "rejected"], "dpo", "sharegpt_ranking"),
])
def test_detect_format(keys, kind, expected):
    assert detect_format(dict.fromkeys(keys, ""), kind, "x.jsonl") == expected


def test_detect_format_errors_list_formats():
    with pytest.raises(DataError) as e:
        detect_format({"foo": 1, "bar": 2}, "sft", "x.jsonl")
    msg = str(e.value)
    assert msg.startswith("x.jsonl: cannot tell the format from the first row's keys (foo, bar)")
    assert all(f.name in msg for f in formats_of("sft")) and "format=" in msg
    with pytest.raises(DataError, match=r"match several SFT formats \(metamath, gsm8k\)"):
        detect_format({"question": 1, "answer": 2, "query": 3, "response": 4}, "sft", "x.jsonl")


def test_every_format_is_in_the_table():
    assert set(FORMATS) == {"alpaca", "openorca", "metamath", "gsm8k", "messages", "sharegpt", "prompt_completion",
                            "preference", "orca_dpo", "hh_rlhf", "sharegpt_ranking"}
