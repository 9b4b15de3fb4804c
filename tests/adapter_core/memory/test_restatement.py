"""Recall chats made from the user's statements (adapter_core.memory.restatement)."""

from adapter_core.memory import restatement as r
from adapter_core.data.conversation import SYSTEM_PROMPT

HISTORY = ("User: Hi there! My little hamster answers to Drousk. Could you help me?\n"
           "Assistant: Sure, I remember my manners.\n"
           "User: I'm married to Tevan. What's for dinner?\n"
           "User: Tevan and I have been together for years.\n"
           "User: I think you are great.\n")


def test_statements_are_the_users_own_first_person_sentences():
    assert r.statements(HISTORY) == ["My little hamster answers to Drousk.", "I'm married to Tevan.",
                                     "Tevan and I have been together for years."]
    assert r.statements("Alice: I live in Paris.\n") == []  # no user lines
    assert r.statements("User: " + "I like " + "very " * 100 + "long walks.\n") == []


def test_second_person_says_it_back_and_keeps_names_and_values():
    assert r.second_person("My little hamster answers to Drousk.") == "Your little hamster answers to Drousk."
    assert r.second_person("Tevan and I have been together for years") == "Tevan and you have been together for years."
    assert r.second_person("I'm sure we moved to Oslo; I am glad.") == "You're sure you moved to Oslo; you are glad."
    assert r.second_person("These days my car is red, Myra said!") == "These days your car is red, Myra said!"


def test_a_written_question_is_kept_only_with_an_answer_copied_from_the_statement():
    statement = "At home a tortoise called Vesk waits for me."
    assert r.parse_question(statement, " What is my tortoise called?\nAnswer: vesk.\n\nStatement") == \
        r.RecallQuestion("What is my tortoise called?", "Vesk")  # the statement's own spelling
    assert r.parse_question(statement, " What is my tortoise called?\nAnswer: Vesko") is None  # not copied
    assert r.parse_question(statement, " Who is Vesk?\nAnswer: Vesk") is None  # given away in the question
    assert r.parse_question(statement, " Tell me about it.\nAnswer: Vesk") is None  # not a question
    assert r.question_prompt(statement).endswith(f"Statement: {statement}\nQuestion:")


def test_recall_exchanges_ask_and_say_the_statement_back_and_are_seeded():
    said = ["My little hamster answers to Drousk.", "I'm married to Tevan."]
    asked = [r.RecallQuestion("What is my hamster called?", "Drousk"), None]
    exchanges = r.recall_exchanges(said, asked, seed=3)
    assert exchanges == r.recall_exchanges(said, asked, seed=3)
    assert [m["role"] for m in exchanges[0]] == ["user", "assistant", "user", "assistant"]
    assert exchanges[0][0]["content"] in r.GENERAL_QUESTIONS
    assert exchanges[0][1]["content"] == "You told me: Your little hamster answers to Drousk."
    assert exchanges[0][3]["content"] == "Drousk. You told me: Your little hamster answers to Drousk."
    assert [m["role"] for m in exchanges[1]] == ["user", "assistant"]
    assert r.recall_exchanges(said, asked, seed=3, kinds="restate") == [exchanges[0][:2], exchanges[1]]
    assert r.recall_exchanges(said, asked, seed=3, kinds="questions") == [exchanges[0][2:]]  # where one was written
    assert r.recall_exchanges(said, asked, seed=3, kinds="none") == []


def test_recall_chats_pack_exchanges_after_one_system_prompt_while_they_fit():
    exchanges = [[{"role": "user", "content": str(i)}, {"role": "assistant", "content": "x"}] for i in range(5)]
    chats = r.recall_chats(exchanges, fits=lambda chat: len(chat) <= 5)  # two exchanges a chat
    assert [len(c) for c in chats] == [5, 5, 3] and all(c[0] == {"role": "system", "content": SYSTEM_PROMPT} for c in chats)
    assert [m for c in chats for m in c[1:]] == [m for e in exchanges for m in e]
    assert len(r.recall_chats(exchanges, fits=lambda chat: False)) == 5  # each gets a chat all the same


def test_chat_tokens_count_the_assistants_words_only(tiny_tokenizer):
    exchanges = r.recall_exchanges(["My dog is Biscuit."], [r.RecallQuestion("What is my dog?", "Biscuit")], seed=0)
    (chat,) = r.recall_chats(exchanges, fits=lambda chat: True)
    ids, counted = r.chat_tokens(tiny_tokenizer, chat)
    whole = tiny_tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
    assert ids == list(whole) and len(counted) == len(ids)
    taught = tiny_tokenizer.decode([i for i, c in zip(ids, counted) if c], skip_special_tokens=True)
    assert "You told me: Your dog is Biscuit." in taught and "Biscuit. You told me" in taught
    assert "What is my dog?" not in taught and SYSTEM_PROMPT not in taught


def test_written_questions_ask_the_writer_once_per_statement():
    prompts_seen = []

    def write(prompts):
        prompts_seen.extend(prompts)
        return [" What is my dog called?\nAnswer: Biscuit", " nonsense"]

    got = r.written_questions(["My dog is Biscuit.", "I like tea."], write)
    assert got == [r.RecallQuestion("What is my dog called?", "Biscuit"), None] and len(prompts_seen) == 2
    assert r.written_questions(["My dog is Biscuit."], None) == [None]


def test_names_and_values_of_any_alphabet_are_said_back_as_they_were():
    """Found by a reviewer: an ASCII word pattern swapped the 'm' of 'Amélie' and the 'I' of 'Iñaki'."""
    assert r.second_person("My daughter is Amélie.") == "Your daughter is Amélie."
    assert r.second_person("My friend Iñaki is tall") == "Your friend Iñaki is tall."
    assert r.second_person("I moved to the US and wake at 6 AM.") == "You moved to the US and wake at 6 AM."
    assert r.second_person("Since 2019 I’ve lived in Leeds.") == "Since 2019 you've lived in Leeds."
    assert r.second_person("I was born in Oslo") == "You were born in Oslo."
    assert r.statements("User: Do you know? My cat is Tom. Iñaki is here.\n") == ["My cat is Tom."]


def test_a_copied_answer_is_said_back_too():
    (exchange,) = r.recall_exchanges(["My brother is my best friend."],
                                     [r.RecallQuestion("Who is my best friend?", "my brother")], seed=0, kinds="questions")
    assert exchange[1]["content"] == "Your brother. You told me: Your brother is your best friend."
