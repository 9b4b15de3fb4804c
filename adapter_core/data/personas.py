"""Synthetic multi-session conversations in which a user states personal facts.

The first prototype learned a classifier over small value pools and recalled nothing new. Here
values are procedural (invented names, numbers, combinations of large word lists), so only
copying what the user said can answer a question, and the held-out split is strict:

* values: a value belongs to the evaluation split iff a hash of its text says so; the training
  sampler never draws one, the evaluation sampler draws nothing else;
* phrasings: every kind of fact has separate statement, update and question templates for
  training and for evaluation.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, replace

from .conversation import Turn
from .dataset import Conversation, Question, Session

TRAIN, EVAL = "train", "eval"
SPLITS = (TRAIN, EVAL)
_HELDOUT_EVERY = 8  # one value in 8 is reserved for evaluation

# --- procedural values ----------------------------------------------------------------------------

_ONSETS = ["b", "br", "c", "d", "dr", "f", "g", "gr", "h", "j", "k", "kr", "l", "m", "n", "p", "pr",
           "qu", "r", "s", "sk", "st", "t", "tr", "th", "v", "w", "z", "sh", "ch"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "io", "ou", "y"]
_CODAS = ["", "", "", "n", "r", "l", "s", "k", "m", "th", "nd", "rk", "st", "x"]
_PLACE_SUFFIXES = ["", "", "ford", "haven", "moor", "wick", "dale", "ton", "mouth", "stead", "bury", "field"]
_COMPANY_SUFFIXES = ["Labs", "Systems", "Logistics", "Bakery", "Studios", "Works", "Analytics", "Foods",
                     "Robotics", "Press", "Clinic", "Partners", "Textiles", "Energy", "Games", "Architects"]
_JOB_MODIFIERS = ["senior", "junior", "freelance", "night-shift", "lead", "assistant", "trainee", "chief",
                  "part-time", "mobile", "regional", "certified", "hospital", "marine", "forest", "museum",
                  "railway", "theatre", "school", "harbour", "laboratory", "studio", "airport", "library"]
_JOBS = ["baker", "nurse", "welder", "architect", "translator", "electrician", "librarian", "pilot",
         "accountant", "carpenter", "pharmacist", "surveyor", "glassblower", "florist", "geologist",
         "locksmith", "paramedic", "plumber", "beekeeper", "cartographer", "chef", "tailor", "engineer",
         "photographer", "veterinarian", "teacher", "programmer", "dentist", "mechanic", "gardener",
         "potter", "journalist", "statistician", "optician", "upholsterer", "sommelier", "archivist",
         "bookbinder", "radiographer", "stonemason", "illustrator", "midwife", "economist", "jeweller"]
_INGREDIENTS = ["plum", "fennel", "walnut", "saffron", "lentil", "mushroom", "pumpkin", "ginger", "chickpea",
                "apricot", "leek", "sesame", "smoked trout", "beetroot", "coconut", "pistachio", "rhubarb",
                "spinach", "chestnut", "lemon", "cardamom", "aubergine", "fig", "halloumi", "mango",
                "parsnip", "quince", "sorrel", "tamarind", "black bean", "celeriac", "cherry", "duck"]
_DISHES = ["stew", "tart", "curry", "risotto", "soup", "dumplings", "pie", "salad", "pancakes", "noodles",
           "flatbread", "omelette", "gnocchi", "chutney", "casserole", "fritters", "pudding", "tacos",
           "ravioli", "crumble", "skewers", "porridge", "sandwich", "biryani"]
_HOBBY_VERBS = ["collecting", "restoring", "painting", "photographing", "building", "repairing", "drawing",
                "carving", "sewing", "cataloguing", "growing", "sketching", "baking", "knitting"]
_HOBBY_OBJECTS = ["old maps", "vintage radios", "model ships", "lighthouses", "bonsai trees", "clocks",
                  "stained glass", "bird houses", "antique keys", "paper lanterns", "kites", "chess sets",
                  "wooden spoons", "tin robots", "pocket watches", "sea shells", "fountain pens", "quilts",
                  "mosaic tiles", "sourdough loaves", "wool hats", "succulents", "street signs", "beetles"]
_BOOK_ADJECTIVES = ["Silent", "Last", "Hidden", "Crimson", "Broken", "Glass", "Winter", "Hollow", "Golden",
                    "Forgotten", "Seventh", "Salt", "Paper", "Iron", "Quiet", "Burning", "Lonely", "Velvet"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December"]
_COLOURS = ["red", "blue", "green", "grey", "white", "black", "silver", "yellow", "orange", "purple", "brown"]


def pseudo_word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))


def _name(rng: random.Random) -> str:
    return pseudo_word(rng, rng.choice([2, 2, 3])).capitalize()


def _place(rng: random.Random) -> str:
    return (pseudo_word(rng, rng.choice([1, 2])) + rng.choice(_PLACE_SUFFIXES)).capitalize()


def _company(rng: random.Random) -> str:
    return f"{_name(rng)} {rng.choice(_COMPANY_SUFFIXES)}"


def _job(rng: random.Random) -> str:
    return f"{rng.choice(_JOB_MODIFIERS)} {rng.choice(_JOBS)}"


def _food(rng: random.Random) -> str:
    return f"{rng.choice(_INGREDIENTS)} {rng.choice(_DISHES)}"


def _band(rng: random.Random) -> str:
    return f"The {_name(rng)}s" if rng.random() < 0.5 else f"{_name(rng)} {_name(rng)}"


def _birthday(rng: random.Random) -> str:
    return f"{rng.choice(_MONTHS)} {rng.randint(1, 28)}"


def _number(rng: random.Random) -> str:
    return str(rng.randint(100, 99999))


def _car(rng: random.Random) -> str:
    return f"{rng.choice(_COLOURS)} {_name(rng)} {rng.randint(2, 990)}"


def _hobby(rng: random.Random) -> str:
    return f"{rng.choice(_HOBBY_VERBS)} {rng.choice(_HOBBY_OBJECTS)}"


def _book(rng: random.Random) -> str:
    return f"The {rng.choice(_BOOK_ADJECTIVES)} {_name(rng)}"


def _street(rng: random.Random) -> str:
    return f"{rng.randint(1, 300)} {_name(rng)} {rng.choice(['Street', 'Road', 'Lane', 'Avenue'])}"


def is_heldout_value(value: str) -> bool:
    """Whether a value is reserved for evaluation (a property of its text alone)."""
    digest = hashlib.sha256(value.strip().lower().encode()).digest()
    return digest[0] % _HELDOUT_EVERY == 0


# --- kinds of facts and their phrasings -------------------------------------------------------------

@dataclass(frozen=True)
class Phrasings:
    statements: tuple[str, ...]
    questions: tuple[str, ...]
    updates: tuple[str, ...] = ()


@dataclass(frozen=True)
class FactKind:
    name: str
    make_value: object  # Callable[[random.Random], str]
    train: Phrasings
    eval: Phrasings

    @property
    def updatable(self) -> bool:
        return bool(self.train.updates)

    def phrasings(self, split: str) -> Phrasings:
        return self.train if split == TRAIN else self.eval


KINDS: tuple[FactKind, ...] = (
    FactKind("user_name", _name,
             Phrasings(("My name is {v}.", "I'm {v}, by the way.", "You can call me {v}.", "Hi, {v} here."),
                       ("What is my name?", "What's my name?", "Do you remember my name?")),
             Phrasings(("People know me as {v}.", "I go by the name {v}."),
                       ("What am I called?", "Tell me my name."))),
    FactKind("pet_name", _name,
             Phrasings(("My cat is called {v}.", "I have a dog named {v}.", "Our parrot's name is {v}.",
                        "I adopted a rabbit and named it {v}."),
                       ("What is my pet's name?", "What did I name my pet?", "What's my pet called?"),
                       ("We had to rehome our old pet; the new one is called {v}.",)),
             Phrasings(("My little hamster answers to {v}.", "At home a tortoise called {v} waits for me."),
                       ("What is the name of the animal I keep?", "Which name does my pet have?"),
                       ("Our pet now is a kitten named {v}.",))),
    FactKind("partner_name", _name,
             Phrasings(("My partner's name is {v}.", "I'm married to {v}.", "My wife is called {v}.",
                        "My husband {v} says hello."),
                       ("What is my partner's name?", "Who am I married to?", "What's my spouse called?")),
             Phrasings(("{v} and I have been together for years; {v} is my partner.",
                        "The person I share my life with is {v}."),
                       ("Who is my partner?", "What is the name of my significant other?"))),
    FactKind("sibling_name", _name,
             Phrasings(("My sister is called {v}.", "I have a brother named {v}.", "My older sibling is {v}.",
                        "My twin's name is {v}."),
                       ("What is my sibling's name?", "What's my brother or sister called?",
                        "Who is my sibling?")),
             Phrasings(("I grew up with a sibling called {v}.", "My younger sibling goes by {v}."),
                       ("Which name does my sibling have?", "Remind me what my sibling is called."))),
    FactKind("best_friend", _name,
             Phrasings(("My best friend is {v}.", "I've known my best friend {v} since school.",
                        "{v} is my closest friend.", "I'm meeting my best friend {v} tonight."),
                       ("Who is my best friend?", "What's my best friend's name?",
                        "What is the name of my closest friend?")),
             Phrasings(("Nobody knows me better than my friend {v}.", "My dearest friend is named {v}."),
                       ("Which friend of mine is the closest?", "Name my best friend."))),
    FactKind("home_city", _place,
             Phrasings(("I live in {v}.", "I'm from a town called {v}.", "Home for me is {v}.",
                        "I grew up in {v} and still live there."),
                       ("Where do I live?", "Which town do I live in?", "What city is my home?"),
                       ("I just moved to {v}.", "We relocated to {v} last month.")),
             Phrasings(("These days I reside in {v}.", "My flat is in {v}."),
                       ("In which place do I reside?", "Where is my home?"),
                       ("Big news: my new home is in {v}.",))),
    FactKind("street_address", _street,
             Phrasings(("My address is {v}.", "I live at {v}.", "Send letters to me at {v}.",
                        "Our house is at {v}."),
                       ("What is my address?", "Where exactly do I live?", "What's my street address?"),
                       ("My new address is {v}.",)),
             Phrasings(("You can find my front door at {v}.", "My postal address reads {v}."),
                       ("At which address can I be found?", "Tell me my home address."),
                       ("After the move my address became {v}.",))),
    FactKind("job", _job,
             Phrasings(("I work as a {v}.", "I'm a {v} by profession.", "My job: {v}.",
                        "I earn my living as a {v}."),
                       ("What is my job?", "What do I do for a living?", "What's my profession?"),
                       ("I changed careers and now work as a {v}.", "I got a new job as a {v}.")),
             Phrasings(("For work I am a {v}.", "My occupation is {v}."),
                       ("What is my occupation?", "What kind of work do I do?"),
                       ("Since last week I am employed as a {v}.",))),
    FactKind("employer", _company,
             Phrasings(("I work at {v}.", "My employer is {v}.", "I've been with {v} for three years.",
                        "The company I work for is {v}."),
                       ("Where do I work?", "Who is my employer?", "Which company do I work for?"),
                       ("I switched companies, I'm now at {v}.",)),
             Phrasings(("My salary comes from {v}.", "I'm on the payroll of {v}."),
                       ("Which firm employs me?", "What is the name of my employer?"),
                       ("I have just joined {v}.",))),
    FactKind("favourite_food", _food,
             Phrasings(("My favourite food is {v}.", "I love {v} more than anything.", "Nothing beats {v}.",
                        "I could eat {v} every day."),
                       ("What is my favourite food?", "What do I love to eat?", "Which dish do I like most?"),
                       ("My new favourite food is {v}.",)),
             Phrasings(("The dish I adore is {v}.", "If I could pick one meal it would be {v}."),
                       ("Which meal do I like best?", "What food is my favourite?"),
                       ("Lately my favourite meal has become {v}.",))),
    FactKind("favourite_band", _band,
             Phrasings(("My favourite band is {v}.", "I listen to {v} all the time.",
                        "I'm a huge fan of {v}.", "I saw {v} live last year."),
                       ("What is my favourite band?", "Which band do I love?", "Who do I listen to most?")),
             Phrasings(("The music I play most is by {v}.", "My top band is {v}."),
                       ("Which group is my favourite?", "Name the band I like most."))),
    FactKind("birthday", _birthday,
             Phrasings(("My birthday is on {v}.", "I was born on {v}.", "I celebrate my birthday on {v}.",
                        "Remember, {v} is my birthday."),
                       ("When is my birthday?", "What is my date of birth?", "On which day was I born?")),
             Phrasings(("Each year on {v} I turn a year older.", "My birthday falls on {v}."),
                       ("Which day is my birthday?", "When do I celebrate my birthday?"))),
    FactKind("locker_code", _number,
             Phrasings(("My locker code is {v}.", "The code for my gym locker is {v}.",
                        "Please remember my locker number: {v}.", "I always use {v} for my locker."),
                       ("What is my locker code?", "What's the code of my locker?",
                        "Which number opens my locker?"),
                       ("I changed my locker code to {v}.",)),
             Phrasings(("My locker opens with {v}.", "The combination on my locker is {v}."),
                       ("What combination opens my locker?", "Tell me my locker number."),
                       ("The locker now opens with {v}.",))),
    FactKind("car", _car,
             Phrasings(("I drive a {v}.", "My car is a {v}.", "I bought a {v} last spring.",
                        "I get around in my {v}."),
                       ("What car do I drive?", "What is my car?", "Which car do I own?"),
                       ("I sold my old car and bought a {v}.",)),
             Phrasings(("The car in my driveway is a {v}.", "I own a {v}."),
                       ("Which vehicle do I have?", "What do I drive?"),
                       ("My current car is a {v}.",))),
    FactKind("trip_destination", _place,
             Phrasings(("I'm planning a trip to {v}.", "Next summer I'll travel to {v}.",
                        "I booked a holiday in {v}.", "I want to visit {v} soon."),
                       ("Where am I planning to travel?", "Where is my next trip?",
                        "Which place am I going to visit?"),
                       ("Change of plans: my trip now goes to {v}.",)),
             Phrasings(("My upcoming journey takes me to {v}.", "Soon I fly to {v} for a holiday."),
                       ("What is the destination of my trip?", "Where am I headed on holiday?"),
                       ("I rebooked, so I'm travelling to {v} instead.",))),
    FactKind("hobby", _hobby,
             Phrasings(("My hobby is {v}.", "In my free time I enjoy {v}.", "I spend weekends {v}.",
                        "I've taken up {v}."),
                       ("What is my hobby?", "What do I do in my free time?", "What do I enjoy doing?"),
                       ("I have a new hobby: {v}.",)),
             Phrasings(("My favourite pastime is {v}.", "When I relax I like {v}."),
                       ("What is my pastime?", "Which hobby do I have?"),
                       ("These days my pastime is {v}.",))),
    FactKind("favourite_book", _book,
             Phrasings(("My favourite book is {v}.", "I keep rereading {v}.", "The best novel I know is {v}.",
                        "I recommend {v} to everyone."),
                       ("What is my favourite book?", "Which book do I love?", "What novel do I reread?")),
             Phrasings(("The book on my nightstand forever is {v}.", "My most loved novel is {v}."),
                       ("Which novel is my favourite?", "Name my favourite book."))),
)
KIND_BY_NAME = {k.name: k for k in KINDS}


# --- everyday values: facts a 135M model can say -----------------------------------------------------
# The invented values above make a model that is told them say a word it never saw, which it rarely
# does even with the whole history in its prompt. These values are common words it can say, drawn
# from lists long enough that guessing one without memory rarely hits (closed book stays near 0).
# Eval-only: no held-out split, and the generator's training data never uses them.

VALUES = ("invented", "everyday")
_EVERYDAY_NAMES = ["Anna", "John", "Maria", "David", "Sarah", "Peter", "Emma", "James", "Laura", "Tom", "Kate",
                   "Paul", "Lisa", "Mark", "Julia", "Mike", "Sophie", "Daniel", "Helen", "Chris", "Nina", "Sam"]
_EVERYDAY_PETS = ["Max", "Bella", "Charlie", "Luna", "Lucy", "Daisy", "Rocky", "Milo", "Buddy", "Coco", "Oscar",
                  "Molly", "Teddy", "Rosie", "Toby", "Lola", "Jack", "Ruby", "Bailey", "Sadie", "Ginger", "Pepper"]
_EVERYDAY_CITIES = ["Paris", "London", "Berlin", "Madrid", "Rome", "Lisbon", "Dublin", "Vienna", "Prague", "Boston",
                    "Chicago", "Toronto", "Sydney", "Tokyo", "Seattle", "Denver", "Oslo", "Athens", "Amsterdam",
                    "Warsaw", "Cairo", "Mumbai"]
_EVERYDAY_JOBS = ["teacher", "nurse", "doctor", "baker", "farmer", "pilot", "lawyer", "chef", "dentist", "plumber",
                  "firefighter", "writer", "painter", "carpenter", "mechanic", "pharmacist", "librarian",
                  "photographer", "journalist", "banker", "gardener", "tailor"]  # no vowel first: "a {v}"
_EVERYDAY_FOODS = ["pizza", "pasta", "sushi", "tacos", "curry", "soup", "salad", "burgers", "pancakes", "noodles",
                   "steak", "lasagna", "chili", "dumplings", "ramen", "paella", "risotto", "falafel", "cheesecake",
                   "waffles", "kebab", "porridge"]
_EVERYDAY_HOBBIES = ["painting", "fishing", "hiking", "gardening", "cooking", "knitting", "swimming", "running",
                     "cycling", "dancing", "singing", "baking", "reading", "camping", "sailing", "skiing", "drawing",
                     "surfing", "climbing", "chess", "pottery", "yoga"]
_EVERYDAY_CARS = ["Toyota", "Ford", "Honda", "Volvo", "Tesla", "BMW", "Mazda", "Nissan", "Kia", "Jeep", "Fiat",
                  "Subaru", "Porsche", "Volkswagen", "Renault", "Peugeot", "Skoda", "Mini", "Lexus", "Jaguar"]
_EVERYDAY_COLOURS = [*_COLOURS, "pink", "gold", "teal", "navy", "beige", "violet", "turquoise", "maroon", "crimson"]


def _one_of(values: list[str]):
    return lambda rng: rng.choice(values)


_EVERYDAY_BY_KIND = {"user_name": _EVERYDAY_NAMES, "pet_name": _EVERYDAY_PETS, "partner_name": _EVERYDAY_NAMES,
                     "sibling_name": _EVERYDAY_NAMES, "best_friend": _EVERYDAY_NAMES, "home_city": _EVERYDAY_CITIES,
                     "trip_destination": _EVERYDAY_CITIES, "job": _EVERYDAY_JOBS, "favourite_food": _EVERYDAY_FOODS,
                     "hobby": _EVERYDAY_HOBBIES, "car": _EVERYDAY_CARS}
EVERYDAY_KINDS: tuple[FactKind, ...] = (
    *(replace(KIND_BY_NAME[name], make_value=_one_of(values)) for name, values in _EVERYDAY_BY_KIND.items()),
    FactKind("favourite_colour", _one_of(_EVERYDAY_COLOURS),
             Phrasings(("My favourite colour is {v}.", "I love the colour {v}."),
                       ("What is my favourite colour?", "Which colour do I like best?"),
                       ("These days my favourite colour is {v}.",)),
             Phrasings(("Everything I own is {v}; it is my favourite colour.", "The colour I like most is {v}."),
                       ("What colour do I like most?", "Which is my favourite colour?"),
                       ("I have changed my mind: my favourite colour is now {v}.",))),
)

# --- filler ---------------------------------------------------------------------------------------

_GREETINGS = ["Hi again!", "Hello!", "Good morning.", "Hey, it's me.", "Evening!", "Hi there."]
_GREETING_REPLIES = ["Hello! Good to hear from you.", "Hi! How can I help today?",
                     "Welcome back! What's on your mind?", "Hey! How are you doing?"]
_CHAT = [
    ("The weather has been strange this week.", "It really has. I hope you stayed dry."),
    ("I watched a documentary about volcanoes.", "Volcanoes are fascinating. What did you learn?"),
    ("Can you suggest a quick breakfast?", "Overnight oats or toast with eggs are quick and filling."),
    ("I'm a bit tired today.", "Sorry to hear that. Maybe a short walk and an early night will help."),
    ("Do you know any good stretching routines?", "Try neck rolls, shoulder circles and a forward fold."),
    ("I finally cleaned the garage.", "That must feel great. Garages collect so much stuff."),
    ("What is a good way to learn a language?", "A little practice every day works better than long sessions."),
    ("My neighbour plays the trumpet at night.", "That sounds frustrating. Maybe a friendly chat would help."),
    ("I read an article about {x} yesterday.", "Interesting! What was it about?"),
    ("A colleague mentioned a place called {x}.", "I don't know much about it, but it sounds intriguing."),
    ("Have you heard of the game {x}?", "I'm not sure I have. What kind of game is it?"),
    ("How long should I boil an egg?", "About seven minutes for a firm yolk, five or six for a soft one."),
    ("Any tips for sleeping better?", "Keep a regular schedule and avoid screens before bed."),
    ("I started a puzzle with a thousand pieces.", "Good luck! Start with the edges."),
    ("It's been a busy day at home.", "Busy days can be tiring. Take a moment for yourself."),
    ("I'm thinking about painting my kitchen.", "A fresh colour can change a room completely."),
    ("What should I cook tonight?", "How about a simple pasta with vegetables?"),
    ("My phone battery dies so fast.", "Lowering the screen brightness can help a lot."),
    ("I saw a huge rainbow this afternoon.", "Lovely! Rainbows always lift the mood."),
    ("Tell me something interesting.", "Octopuses have three hearts and blue blood."),
]
_ACKS = ["Thanks for telling me!", "Got it, I'll remember that.", "That's nice to know.", "Noted!",
         "How lovely.", "Good to know.", "Oh, interesting!", "I'll keep that in mind."]

# --- conversations ----------------------------------------------------------------------------------


def _estimate_tokens(turns: list[Turn]) -> int:
    return sum(len(t.text) + 12 for t in turns) // 4  # about 4 characters per token, plus role lines


def _draw_value(kind: FactKind, rng: random.Random, split: str, avoid: set[str], held_out: bool = True) -> str:
    """A value of the split's (held_out False: any value of the kind) not in `avoid`."""
    want_heldout = split == EVAL
    for _ in range(1000):
        value = kind.make_value(rng)
        if (not held_out or is_heldout_value(value) == want_heldout) and value.lower() not in avoid:
            return value
    raise RuntimeError(f"could not draw a {split} value for {kind.name}")


def _chit_chat(rng: random.Random) -> list[Turn]:
    user, reply = rng.choice(_CHAT)
    return [Turn("user", user.replace("{x}", _name(rng))), Turn("assistant", reply)]


def make_conversation(rng: random.Random, split: str, n_facts: int, target_tokens: int,
                      update_probability: float = 0.3, cid: str = "", values: str = "invented") -> Conversation:
    """A conversation of several sessions in which the user states `n_facts` facts (some updated
    later) among chit-chat, padded with chit-chat to about `target_tokens`, with one question per fact.
    values: "invented" (made-up words, split into train and held-out) or "everyday" (eval only)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    if values not in VALUES:
        raise ValueError(f"values must be one of {VALUES}")
    everyday = values == "everyday"
    if everyday and split != EVAL:
        raise ValueError("everyday values are for evaluation only")
    pool = EVERYDAY_KINDS if everyday else KINDS
    if not 1 <= n_facts <= len(pool):
        raise ValueError(f"n_facts must be between 1 and {len(pool)}")
    kinds = rng.sample(pool, n_facts)
    used: set[str] = set()
    events = []  # (kind, value, is_update)
    for kind in kinds:
        value = _draw_value(kind, rng, split, used, held_out=not everyday)
        used.add(value.lower())
        events.append((kind, value, False))
    history: dict[str, list[str]] = {k.name: [v] for k, v, _ in events}
    for kind in kinds:
        if kind.updatable and rng.random() < update_probability:
            value = _draw_value(kind, rng, split, used, held_out=not everyday)
            used.add(value.lower())
            events.append((kind, value, True))
            history[kind.name].append(value)

    # Statements in order (updates after every first statement), chit-chat spread between them.
    fact_turns = []
    for kind, value, is_update in events:
        phrasings = kind.phrasings(split)
        template = rng.choice(phrasings.updates if is_update else phrasings.statements)
        fact_turns.append([Turn("user", template.format(v=value)), Turn("assistant", rng.choice(_ACKS))])
    n_sessions = max(1, min(len(fact_turns), rng.randint(2, 5)))
    sessions: list[list[Turn]] = [[Turn("user", rng.choice(_GREETINGS)),
                                   Turn("assistant", rng.choice(_GREETING_REPLIES))] for _ in range(n_sessions)]
    for pair, (_, _, is_update) in zip(fact_turns, events):
        # first statements go to the earlier sessions, updates to the last one
        last = n_sessions - 1
        sessions[last if is_update or last == 0 else rng.randrange(last)].extend(pair)
    while _estimate_tokens([t for s in sessions for t in s]) < target_tokens:
        s = rng.randrange(n_sessions)
        position = 2 + 2 * rng.randint(0, (len(sessions[s]) - 2) // 2)
        sessions[s][position:position] = _chit_chat(rng)

    # evidence: where the latest value was said (turns are found by identity: texts may repeat)
    position = {id(t): (s, j) for s, session in enumerate(sessions) for j, t in enumerate(session)}
    # updates come after all first statements in `events`, so the latest value's turn is the one kept
    said = {kind.name: position[id(pair[0])] for pair, (kind, _, _) in zip(fact_turns, events)}
    questions = []
    for kind in kinds:
        values = history[kind.name]
        questions.append(Question(question=rng.choice(kind.phrasings(split).questions), answer=values[-1],
                                  superseded=values[:-1], category=kind.name, evidence=[said[kind.name]]))
    meta = {"split": split, "n_facts": n_facts, "target_tokens": target_tokens,
            "updates": sum(1 for e in events if e[2]), "values": values}
    return Conversation(cid, [Session(turns) for turns in sessions], questions, meta)


def make_eval_set(seed: int, facts: list[int], lengths: list[int], per_cell: int,
                  update_probability: float = 0.3, values: str = "invented") -> list[Conversation]:
    """Held-out conversations for every (facts, length) cell, at least `per_cell` questions each."""
    rng = random.Random(f"eval-{seed}" if values == "invented" else f"eval-{values}-{seed}")
    conversations = []
    for n_facts in facts:
        for length in lengths:
            questions = 0
            while questions < per_cell:
                cid = f"eval-f{n_facts}-t{length}-{len(conversations):06d}"
                c = make_conversation(rng, EVAL, n_facts, length, update_probability, cid, values)
                conversations.append(c)
                questions += len(c.questions)
    return conversations
