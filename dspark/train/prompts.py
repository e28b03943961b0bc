"""Training prompts: user files, generators shipped with the package, mixing, and the evaluation leak check.

Every source returns prompt records in the schema of `dspark.evaluation.prompt_sets` (`id`, `domain`, `turns`, `raw`,
plus `source` saying where the prompt came from). On-policy training only needs prompts (the target writes the answers,
`dspark.train.responses`), and no public instruction dataset is reachable offline, so the package ships generators
that build prompts from word lists, templates, the Python standard library and the target itself.

Evaluation prompts (MT-bench, HumanEval, MMATH) must never reach training data: every path that writes training data
calls `check_no_evaluation_leak`, which matches prompts up to case, whitespace and punctuation, and also finds an
evaluation prompt pasted inside a longer training prompt.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import inspect
import json
import os
import random
import re
import textwrap
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ..evaluation.prompt_sets import BUILTIN_PROMPT_SETS, load_prompt_set, normalize_record, prompt_fingerprint

# An evaluation prompt whose normalised text has at least this many characters is also searched for *inside* longer
# training prompts; shorter ones ("Now make it shorter.") only count as leaks when a training prompt equals them.
MIN_EMBEDDED_LEAK_CHARS = 40

# ======================================================================================================================
# Files
# ======================================================================================================================

ACCEPTED_FIELDS = (
    "`prompt`, `turns` (list of strings), `messages` (role/content), `conversations` (ShareGPT from/value) "
    "or `instruction` (+ optional `input`)"
)


def load_prompt_file(path: str | Path, default_domain: str = "chat") -> list[dict]:
    """Prompt records from a JSONL file (one object per line) or a JSON file holding a list of objects.

    Accepted objects: {"prompt": str}, {"turns": [str, ...]}, HF chat {"messages": [{"role", "content"}, ...]},
    ShareGPT {"conversations": [{"from", "value"}, ...]}, Alpaca {"instruction": str, "input": str}. Only user turns
    are kept (the target writes its own answers; system messages are dropped). Optional `id` and `domain` are kept;
    the default id is `<file stem>/<line>` (JSONL) or `<file stem>/<index>` (JSON list). Errors name file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dspark: prompt file {path} does not exist.")
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    # Decided by content, not suffix: a `.json` file written one object per line is JSONL in all but name.
    items = _json_list_items(text, path) if stripped.startswith("[") else _jsonl_items(text, path)
    records = []
    for item, line, default_id in items:
        where = f"{path}:{line}"
        records.append(normalize_record(_to_prompt_schema(item, where), default_domain, default_id, where))
        records[-1].setdefault("source", f"file:{path.name}")
    if not records:
        raise ValueError(f"dspark: prompt file {path} holds no prompts.")
    return records


def _jsonl_items(text: str, path: Path) -> list[tuple[object, int, str]]:
    """(object, line number, default id) for every non-blank line."""
    items = []
    for line_number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            items.append((json.loads(line), line_number, f"{path.stem}/{line_number}"))
        except json.JSONDecodeError as error:
            hint = " (a JSON file must hold one list; JSONL one object per line)" if line_number == 1 else ""
            raise ValueError(f"dspark: {path}:{line_number} is not valid JSON ({error.msg}){hint}.") from None
    return items


def _json_list_items(text: str, path: Path) -> list[tuple[object, int, str]]:
    """(object, line number where it starts, default id) for every element of a top-level JSON list.

    Decoded element by element so that an error in a bad record can name its line, as it does for JSONL.
    """
    decoder = json.JSONDecoder()
    position = text.index("[") + 1
    items: list[tuple[object, int, str]] = []

    def skip_space(at: int) -> int:
        while at < len(text) and text[at].isspace():
            at += 1
        return at

    def line_of(at: int) -> int:
        return text.count("\n", 0, at) + 1

    position = skip_space(position)
    if position < len(text) and text[position] == "]":
        return items
    while True:
        try:
            item, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise ValueError(f"dspark: {path}:{error.lineno} is not valid JSON ({error.msg}).") from None
        items.append((item, line_of(position), f"{path.stem}/{len(items)}"))
        position = skip_space(end)
        if position < len(text) and text[position] == ",":
            position = skip_space(position + 1)
            continue
        if position < len(text) and text[position] == "]":
            if skip_space(position + 1) != len(text):
                raise ValueError(f"dspark: {path}:{line_of(position)}: text after the end of the JSON list.")
            return items
        raise ValueError(f"dspark: {path}:{line_of(position)} is not valid JSON (expected ',' or ']').")


def _message_text(content: object, where: str) -> str:
    """Text of a chat message: a string, or the text parts of a multimodal content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        texts = [part.get("text") for part in content if part.get("type") == "text"]
        if texts and all(isinstance(text, str) for text in texts):
            return "\n".join(texts)
    raise ValueError(f"dspark: {where}: a message's content must be text (a string or a list of text parts).")


def _user_turns(messages: object, role_key: str, text_key: str, user_roles: tuple[str, ...], where: str) -> list[str]:
    if not isinstance(messages, list) or not all(isinstance(message, dict) for message in messages):
        raise ValueError(f"dspark: {where}: `{role_key}`/`{text_key}` messages must be a list of objects.")
    turns = []
    for index, message in enumerate(messages):
        if role_key not in message or text_key not in message:
            raise ValueError(f"dspark: {where}: message {index} needs `{role_key}` and `{text_key}`.")
        if message[role_key] in user_roles:
            turns.append(_message_text(message[text_key], where))
    if not turns:
        raise ValueError(f"dspark: {where}: the conversation has no user message ({'/'.join(user_roles)}).")
    return turns


def _to_prompt_schema(item: object, where: str) -> dict:
    """One file object -> {turns, raw?, id?, domain?}; the common schema is finished by `normalize_record`."""
    if not isinstance(item, dict):
        raise ValueError(f"dspark: {where}: expected a JSON object, got {type(item).__name__}.")
    if "turns" in item:
        turns = item["turns"]
        if not isinstance(turns, list):
            raise ValueError(f"dspark: {where}: `turns` must be a list of strings.")
    elif "prompt" in item:
        turns = [item["prompt"]]
    elif "messages" in item:
        turns = _user_turns(item["messages"], "role", "content", ("user",), where)
    elif "conversations" in item:
        turns = _user_turns(item["conversations"], "from", "value", ("human", "user"), where)
    elif "instruction" in item:
        instruction, extra = item["instruction"], item.get("input") or ""
        if not isinstance(instruction, str) or not isinstance(extra, str):
            raise ValueError(f"dspark: {where}: `instruction` and `input` must be strings.")
        turns = [f"{instruction}\n\n{extra}" if extra.strip() else instruction]
    else:
        raise ValueError(f"dspark: {where}: a prompt record needs one of {ACCEPTED_FIELDS}; got {sorted(item)}.")
    record: dict = {"turns": turns}
    for key in ("id", "domain"):
        if key in item:
            if not isinstance(item[key], str | int) or isinstance(item[key], bool):
                raise ValueError(f"dspark: {where}: `{key}` must be a string.")
            record[key] = str(item[key])
    if isinstance(item.get("raw"), str):
        record["raw"] = item["raw"]
    return record


def write_prompt_file(records: Sequence[dict], path: str | Path) -> Path:
    """Write training prompts as JSONL (atomically), after the evaluation leak check."""
    check_no_evaluation_leak(records)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(partial, path)
    return path


# ======================================================================================================================
# Generator: topics x task templates (chat, knowledge, writing, reasoning)
# ======================================================================================================================

# Each category pairs a topic list with the templates that read naturally for it ("Plan a trip to {topic}" suits
# places, not inventors); every topic also gets `SHARED_TEMPLATES`. Topics are phrased to fit their templates.
SCIENCE_TOPICS = """photosynthesis; the water cycle; plate tectonics; volcanoes; earthquakes; the immune system;
vaccines; DNA replication; cell division; the human heart; the nervous system; digestion; antibiotics; viruses;
bacteria; evolution by natural selection; fossils; genetics; climate change; the greenhouse effect; ocean currents;
the carbon cycle; the nitrogen cycle; black holes; the Big Bang; the solar system; the phases of the Moon; eclipses;
the life cycle of a star; exoplanets; gravity; friction; magnetism; static electricity; electric circuits; sound
waves; the speed of light; rainbows; lasers; radioactivity; nuclear fusion; chemical reactions; acids and bases;
the periodic table; states of matter; crystals; catalysts; enzymes; the scientific method; entropy; buoyancy;
tides; hurricanes; tornadoes; lightning; glaciers; erosion; soil formation; the ozone layer; biodiversity;
food chains; pollination; sleep and the brain; memory; muscles and exercise; the sense of smell"""

NATURE_TOPICS = """honeybees; ants; octopuses; whales; dolphins; elephants; wolves; crows; owls; penguins; sharks;
coral reefs; rainforests; deserts; mangroves; wetlands; tundra; mountains; rivers; caves; mushrooms; giant sequoias;
cacti; migratory birds; butterflies; frogs; turtles; bats; tigers; hummingbirds; jellyfish; lichens"""

TECHNOLOGY_TOPICS = """the internet; search engines; encryption; cloud computing; machine learning; neural networks;
smartphones; GPS; solar panels; wind turbines; electric cars; lithium-ion batteries; 3D printing; virtual reality;
robots; drones; satellites; rockets; the printing press; the steam engine; the telephone; television; radio;
refrigerators; microwaves; compilers; open source software; blockchains; barcodes; QR codes; Wi-Fi; fiber optics;
semiconductors; self-driving cars; speech recognition"""

SOCIETY_TOPICS = """democracy; inflation; supply and demand; interest rates; taxes; human rights; free trade; minimum
wage laws; public libraries; public transport; city planning; recycling programs; renewable energy policy; social
media; online privacy; fake news; critical thinking; remote work; the four-day work week; universal basic income;
urbanization; tourism; the gig economy; standardized testing; homeschooling; volunteering; museums; zoos"""

HISTORY_TOPICS = """the Roman Empire; ancient Egypt; ancient Greece; the Silk Road; the Renaissance; the Industrial
Revolution; the French Revolution; the American Revolution; the Cold War; the moon landing; the fall of the Berlin
Wall; the Black Death; the invention of writing; the Viking age; the Ottoman Empire; the Mongol Empire; the Aztec
Empire; the Inca road system; the age of exploration; the printing revolution; the abolition of slavery; the
women's suffrage movement; the Great Depression; the First World War; the Second World War; the founding of the
United Nations; the space race; the history of the Olympic Games; the history of money; the history of medicine;
the history of the bicycle; the history of aviation; the history of chess; the history of coffee; the history of
the postal service; the Meiji Restoration; the partition of India; the Apollo 13 mission; the building of the
pyramids; the Great Wall of China"""

PEOPLE_TOPICS = """Marie Curie; Isaac Newton; Albert Einstein; Ada Lovelace; Leonardo da Vinci; William Shakespeare;
Charles Darwin; Galileo Galilei; Nikola Tesla; Rosalind Franklin; Alan Turing; Grace Hopper; Cleopatra; Julius
Caesar; Genghis Khan; Mahatma Gandhi; Nelson Mandela; Abraham Lincoln; Frida Kahlo; Ludwig van Beethoven; Wolfgang
Amadeus Mozart; Jane Austen; Mark Twain; Confucius; Aristotle; Hypatia; Florence Nightingale; Louis Pasteur;
Johannes Gutenberg; the Wright brothers; Amelia Earhart; Katherine Johnson"""

SKILL_TOPICS = """saving money; making a monthly budget; cooking for one; meal planning; keeping houseplants alive;
starting a vegetable garden; composting at home; learning a new language; studying for exams; taking good notes;
public speaking; job interviews; writing a resume; negotiating a salary; time management; beating procrastination;
getting better sleep; starting to run; stretching; staying hydrated; reducing screen time; decluttering a home;
moving to a new city; making new friends as an adult; giving constructive feedback; working in a team; leading a
small team; running a meeting; training a puppy; caring for an older cat; babysitting; hosting a dinner party;
planning a birthday party; camping; hiking safely; first aid at home; fire safety at home; riding a bicycle in the
city; learning to swim; learning the guitar; learning to draw; taking better photos with a phone; writing a
journal; reading more books; learning to touch type; repairing a flat bicycle tire; ironing a shirt; packing a
suitcase; writing thank-you notes"""

FOOD_TOPICS = """banana bread; tomato soup; fried rice; pancakes; lentil curry; homemade pizza; sourdough bread;
guacamole; vegetable stir-fry; chocolate chip cookies; roast chicken; mushroom risotto; hummus; French omelettes;
miso soup; apple pie; chili con carne; Greek salad; fresh pasta; spring rolls; falafel; pad thai; porridge; fruit
smoothies; lemonade; iced tea; granola; shakshuka; potato salad; vegetable lasagna"""

PLACE_TOPICS = """Kyoto; Lisbon; Iceland; the Scottish Highlands; Rome; Istanbul; Mexico City; Vancouver; New
Zealand's South Island; Morocco; Vietnam; Peru; the Swiss Alps; Barcelona; Prague; Seoul; Cape Town; Buenos Aires;
Norway's fjords; Sicily; the Greek islands; Singapore; Copenhagen; Budapest; Costa Rica; Jordan; Tasmania; Quebec
City; Edinburgh; the Amalfi Coast"""

PROGRAMMING_TOPICS = """recursion; variables and types; loops; functions; classes and objects; inheritance;
interfaces; closures; higher-order functions; list comprehensions; generators; iterators; exceptions; unit
testing; test-driven development; version control with git; merge conflicts; code review; refactoring; hash
tables; linked lists; binary search trees; heaps; graphs; stacks and queues; sorting algorithms; binary search;
dynamic programming; big-O notation; memory management; garbage collection; threads; async programming; race
conditions; deadlocks; caching; REST APIs; SQL joins; database indexes; regular expressions; floating-point
numbers; unicode and text encodings; immutability; dependency injection; logging; debugging"""

ARTS_TOPICS = """jazz; classical music; the blues; hip-hop; opera; impressionist painting; abstract art; sculpture;
photography; film making; animation; comic books; poetry; the short story; science fiction; fantasy novels; mystery
novels; theater; ballet; street art; architecture; graphic design; calligraphy; origami; pottery; knitting; chess;
board games; video games; stand-up comedy; folk tales; mythology"""

# (domain, template). `{other}` is another topic of the same category.
SHARED_TEMPLATES = [
    ("writing", "Write a short story that involves {topic}."),
    ("writing", "Write a haiku about {topic}."),
    ("writing", "Write the opening paragraph of a blog post about {topic}."),
    ("writing", "Write a short dialogue between two friends who are talking about {topic}."),
    ("writing", "Write a friendly email inviting a colleague to a lunchtime talk about {topic}."),
    ("writing", "Write a two-minute speech for a school assembly about {topic}."),
    ("knowledge", "Create a short quiz with three questions about {topic}, and give the answers."),
    ("chat", "What are three good questions to ask an expert on {topic}?"),
    ("reasoning", "Plan a one-hour lesson about {topic} for high-school students."),
]

# Comparisons read well within a category of things (two animals, two cities), not between two life skills.
COMPARE_TEMPLATES = [
    ("reasoning", "Compare {topic} and {other}: how are they similar, and how are they different?"),
    ("reasoning", "What is the connection between {topic} and {other}?"),
]

CONCEPT_TEMPLATES = [
    ("knowledge", "Explain {topic} to a ten-year-old."),
    ("knowledge", "Explain {topic} in simple terms, then give one real-world example."),
    ("knowledge", "Give me three interesting facts about {topic}."),
    ("knowledge", "What are the most common misconceptions about {topic}?"),
    ("knowledge", "Describe {topic} using a simple analogy."),
    ("knowledge", "Summarize the key ideas of {topic} in five bullet points."),
    ("knowledge", "Give me a five-sentence summary of {topic}."),
    ("chat", "Why does {topic} matter in everyday life?"),
    ("chat", "Why do people find {topic} interesting? Give three reasons."),
    ("reasoning", "What would someone need to learn first in order to understand {topic}?"),
]

HISTORY_TEMPLATES = [
    ("knowledge", "Describe {topic} in a short paragraph."),
    ("knowledge", "Give me three interesting facts about {topic}."),
    ("knowledge", "Explain {topic} to a ten-year-old."),
    ("reasoning", "What were the main causes of {topic}?"),
    ("reasoning", "What were the most important consequences of {topic}?"),
    ("reasoning", "What can people today learn from {topic}?"),
    ("writing", "Write a diary entry from someone who lived through {topic}."),
]

PEOPLE_TEMPLATES = [
    ("knowledge", "Who was {topic}, and why are they remembered?"),
    ("knowledge", "Describe the most important achievements of {topic}."),
    ("knowledge", "Give me three interesting facts about {topic}."),
    ("reasoning", "What challenges did {topic} face, and how were they overcome?"),
    ("writing", "Write a short imaginary interview with {topic}."),
    ("writing", "Write a short children's book passage about {topic}."),
]

SKILL_TEMPLATES = [
    ("chat", "Give three practical tips for {topic}."),
    ("chat", "What mistakes do people often make with {topic}?"),
    ("chat", "I'm a complete beginner at {topic}. Where should I start?"),
    ("chat", "My friend wants to get better at {topic}. What advice would you give them?"),
    ("reasoning", "Make a simple one-week plan for getting better at {topic}."),
    ("reasoning", "Explain why {topic} is harder than it looks, and how to make it easier."),
    ("writing", "Write a short checklist for {topic}."),
]

FOOD_TEMPLATES = [
    ("chat", "Give me a simple recipe for {topic}."),
    ("chat", "What are common mistakes when making {topic}, and how do I avoid them?"),
    ("chat", "How can I make {topic} a bit healthier without losing flavour?"),
    ("knowledge", "Describe the history and origin of {topic}."),
    ("writing", "Write a short restaurant-menu description of {topic}."),
    ("reasoning", "Plan a dinner for four people around {topic}, with a starter and a dessert."),
]

PLACE_TEMPLATES = [
    ("reasoning", "Plan a three-day trip to {topic} on a modest budget."),
    ("reasoning", "Make a packing list for a week in {topic}."),
    ("chat", "What should a first-time visitor to {topic} know?"),
    ("knowledge", "Describe the food and culture of {topic}."),
    ("knowledge", "What is the best time of year to visit {topic}, and why?"),
    ("writing", "Write a postcard message from a holiday in {topic}."),
]

PROGRAMMING_TEMPLATES = [
    ("code", "Explain {topic} in programming, with a short Python example."),
    ("code", "When should a programmer use {topic}, and when should they avoid it?"),
    ("code", "What are common bugs or pitfalls related to {topic}?"),
    ("code", "Explain {topic} to someone who has never written code."),
    ("code", "Give an interview question about {topic}, with a good answer."),
]

TOPIC_CATEGORIES: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "science": (SCIENCE_TOPICS, CONCEPT_TEMPLATES + COMPARE_TEMPLATES),
    "nature": (NATURE_TOPICS, CONCEPT_TEMPLATES + COMPARE_TEMPLATES),
    "technology": (TECHNOLOGY_TOPICS, CONCEPT_TEMPLATES + COMPARE_TEMPLATES),
    "society": (SOCIETY_TOPICS, CONCEPT_TEMPLATES + COMPARE_TEMPLATES),
    "history": (HISTORY_TOPICS, HISTORY_TEMPLATES + COMPARE_TEMPLATES),
    "people": (PEOPLE_TOPICS, PEOPLE_TEMPLATES + COMPARE_TEMPLATES),
    "skills": (SKILL_TOPICS, SKILL_TEMPLATES),
    "food": (FOOD_TOPICS, FOOD_TEMPLATES + COMPARE_TEMPLATES),
    "places": (PLACE_TOPICS, PLACE_TEMPLATES + COMPARE_TEMPLATES),
    "programming": (PROGRAMMING_TOPICS, PROGRAMMING_TEMPLATES + COMPARE_TEMPLATES),
    "arts": (ARTS_TOPICS, CONCEPT_TEMPLATES + COMPARE_TEMPLATES),
}


def _split_list(text: str) -> list[str]:
    return [" ".join(item.split()) for item in text.split(";") if item.strip()]


def _generated(source: str, index: int, domain: str, text: str) -> dict:
    return {"id": f"{source}/{index}", "domain": domain, "turns": [text], "raw": text, "source": f"dspark:{source}"}


def topic_prompts(count: int, seed: int = 0) -> list[dict]:
    """Chat, knowledge, writing and reasoning prompts: a few hundred topics crossed with task templates.

    The full pool (every topic with its category's and the shared templates) is shuffled by `seed`, so any count up
    to the pool size (about 7,800) gives distinct prompts, and a larger count extends a smaller one.
    """
    pool = []
    for category, (topic_text, templates) in TOPIC_CATEGORIES.items():
        topics = _split_list(topic_text)
        for topic in topics:
            for domain, template in [*templates, *SHARED_TEMPLATES]:
                pool.append((category, domain, template, topic))
    rng = random.Random(f"dspark-topics-{seed}")
    rng.shuffle(pool)
    records = []
    for index, (category, domain, template, topic) in enumerate(pool[:count]):
        others = [other for other in _split_list(TOPIC_CATEGORIES[category][0]) if other != topic]
        text = template.format(topic=topic, other=rng.choice(others))
        records.append(_generated("topics", index, domain, text[0].upper() + text[1:]))
    return records


# ======================================================================================================================
# Generator: Python code tasks (task list, stdlib docstrings, stdlib source)
# ======================================================================================================================

CODE_TASKS = """reverse a string; check whether a string is a palindrome, ignoring case and spaces; count the vowels in
a string; find the largest number in a list without using max; compute the factorial of n iteratively; return the
n-th Fibonacci number; check whether a number is prime; list all prime numbers below n with a sieve; compute the
greatest common divisor of two integers; merge two sorted lists into one sorted list; remove duplicates from a list
while keeping the original order; flatten an arbitrarily nested list; count word frequencies in a text; find the
second largest distinct value in a list; rotate a list to the right by k positions; check whether two strings are
anagrams; convert a temperature from Celsius to Fahrenheit; convert a non-negative integer to its binary string;
sum the digits of an integer; find the longest word in a sentence; capitalize the first letter of every word;
compute the median of a list of numbers; transpose a matrix given as a list of lists; multiply two matrices;
implement binary search on a sorted list; implement insertion sort; implement merge sort; implement quicksort;
check whether a string of brackets is balanced; convert a Roman numeral to an integer; convert an integer to a
Roman numeral; generate the power set of a list; generate all permutations of a string; compute the dot product of
two vectors; scale a list of numbers so that they sum to one; implement a stack class with push, pop and peek;
implement a queue using two stacks; implement a singly linked list with append and reverse; compress a string with
run-length encoding; decode a run-length encoded string; find the missing number in a list containing 1 to n with
one gap; check whether a year is a leap year; count the days between two dates given as strings; format an integer
with thousands separators; split a list into chunks of size k; return the most common element of a list; compute
the Levenshtein distance between two strings; shuffle a list in place with the Fisher-Yates algorithm; compute
compound interest for a given rate and number of years; sort a list of dictionaries by one key; build an index that
maps each word of a text to the line numbers where it appears; parse a simple key=value configuration string into
a dictionary; validate that a string is a well-formed IPv4 address; convert a snake_case name to camelCase; find
all pairs in a list that sum to a target value; return the running maximum of a list; compute the moving average of
a list with window size k; check whether a binary tree is balanced; compute the depth of a binary tree; do a
breadth-first search on a graph given as an adjacency dictionary; detect a cycle in a directed graph; find the
shortest path in an unweighted grid maze; implement a least-recently-used cache class; memoize a recursive function
with a decorator; retry a function call up to three times when it raises an exception; read a CSV file and return
the average of one numeric column; write a list of dictionaries to a CSV file; count the lines, words and
characters of a text file; find the longest common prefix of a list of strings; check whether a sentence is a
pangram; encode a string with a Caesar cipher; group a list of words into anagram groups; return the intersection
of two lists without duplicates; compute the area of a polygon from its vertices; convert seconds into an hours,
minutes and seconds string; generate a random password with letters, digits and symbols; merge overlapping
intervals; find the k largest elements of a list using a heap; evaluate a postfix arithmetic expression"""

CODE_TEMPLATES = [
    "Write a Python function to {task}.",
    "Write a Python function to {task}. Include a docstring and type hints.",
    "Write a Python function to {task}, and show two example calls with their expected output.",
    "How would you {task} in Python? Show the code and explain it briefly.",
    "Write a Python function to {task}, then write unit tests for it with pytest.",
    "Write an efficient Python function to {task} and state its time complexity.",
    "Write a Python function to {task} without using any imports.",
    "Explain step by step how to {task} in Python, then give the final code.",
]

EXPLAIN_TEMPLATES = [
    "Explain what this Python code does:\n\n```python\n{code}\n```",
    "What does the following function do? Describe its inputs, its output and any edge cases.\n\n"
    "```python\n{code}\n```",
    "Review this Python function and suggest one improvement:\n\n```python\n{code}\n```",
    "Add type hints and a docstring to this function:\n\n```python\n{code}\n```",
    "Write two unit tests for this function:\n\n```python\n{code}\n```",
]

# Standard-library modules whose functions make sensible self-contained exercises. Their docstrings and source come
# with the Python installation, so these prompts need no network; they follow the installed Python's version.
STDLIB_MODULES = (
    "base64 bisect calendar cmath colorsys csv difflib email.utils fnmatch functools glob heapq html ipaddress "
    "json keyword linecache math mimetypes operator posixpath pprint quopri reprlib secrets shlex shutil statistics "
    "string textwrap tokenize traceback unicodedata urllib.parse uuid"
).split()


DOCSTRING_TASK_VERBS = frozenset(
    "Return Returns Compute Calculate Convert Converts Decode Encode Test Generate Determine Parse Format Split Join "
    "Transform Compare Collapse Expand Normalize Translate Find Insert Remove Replace Serialize Deserialize Quote "
    "Unquote Escape Unescape Wrap Fill Dedent Indent Shorten Merge Count Guess".split()
)


def _first_sentence(doc: str) -> str:
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    match = re.match(r"(.+?[.!?])(\s|$)", paragraph)
    return match.group(1) if match else paragraph


def _stdlib_functions() -> list[tuple[str, str, Callable]]:
    """(module name, function name, function) of public functions defined in `STDLIB_MODULES`, in a fixed order."""
    found = []
    for module_name in STDLIB_MODULES:
        module = importlib.import_module(module_name)
        for name, function in inspect.getmembers(module):
            if name.startswith("_") or name in ("main", "test"):  # command-line entry points, not exercises
                continue
            if not (inspect.isfunction(function) or inspect.isbuiltin(function)):
                continue
            # skip functions re-exported from elsewhere; C accelerators (`_heapq`) count as the module's own
            home = getattr(function, "__module__", None) or module_name
            if home.lstrip("_") != module_name.split(".")[-1] and home != module_name:
                continue
            found.append((module_name, name, function))
    return found


@functools.lru_cache(maxsize=1)
def stdlib_docstring_tasks() -> tuple[str, ...]:
    """'Write a Python function `name(signature)` that ...' from the first docstring sentence of stdlib functions."""
    tasks = []
    for module_name, name, function in _stdlib_functions():
        sentence = _first_sentence(inspect.getdoc(function) or "")
        # "Return the median of data." is an exercise; "Same as a + b." or "Registers a format." is not
        if not 20 <= len(sentence) <= 200 or sentence.split()[0] not in DOCSTRING_TASK_VERBS:
            continue
        try:
            signature = str(inspect.signature(function))
        except (TypeError, ValueError):
            signature = "(...)"
        if " at 0x" in signature:  # a sentinel default's repr holds a memory address: not deterministic
            continue
        tasks.append(
            f"Write a Python function `{name}{signature}` that does the following, without importing "
            f"`{module_name}`: {sentence}"
        )
    return tuple(tasks)


@functools.lru_cache(maxsize=1)
def stdlib_code_snippets(min_lines: int = 4, max_lines: int = 30) -> tuple[str, ...]:
    """Source of short pure-Python stdlib functions with the docstring removed (the reader should explain it)."""
    snippets = []
    for _, _, function in _stdlib_functions():
        if not inspect.isfunction(function):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
        except (OSError, TypeError, SyntaxError):
            continue
        definition = tree.body[0]
        if not isinstance(definition, ast.FunctionDef):
            continue
        body = definition.body
        if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
            definition.body = body[1:] or [ast.Pass()]
        definition.decorator_list = []
        code = ast.unparse(definition)
        # private helpers (`_builtin_open`, `_sentinel`) make a snippet unreadable without its module
        if min_lines <= len(code.splitlines()) <= max_lines and not re.search(r"\b_[A-Za-z]", code):
            snippets.append(code)
    return tuple(snippets)


def code_prompts(count: int, seed: int = 0) -> list[dict]:
    """Python coding prompts (domain `code`): a task list crossed with templates, re-implementations of documented
    stdlib functions, and "explain / review / test this code" prompts on short stdlib functions.

    The pool holds about 1,200 prompts (the stdlib part depends on the installed Python version).
    """
    tasks = _split_list(CODE_TASKS)
    pool = [template.format(task=task) for template in CODE_TEMPLATES for task in tasks]
    pool += stdlib_docstring_tasks()
    pool += [template.format(code=code) for template in EXPLAIN_TEMPLATES for code in stdlib_code_snippets()]
    rng = random.Random(f"dspark-code-{seed}")
    rng.shuffle(pool)
    return [_generated("code", index, "code", text) for index, text in enumerate(pool[:count])]


# ======================================================================================================================
# Generator: math word problems (templates with random numbers)
# ======================================================================================================================


def _math_problem(rng: random.Random) -> str:
    """One word problem; numbers are drawn so that the problem is well posed (integer counts, positive results)."""
    a, b, c = rng.randint(12, 40), rng.randint(2, 12), rng.randint(3, 9)
    name = rng.choice(["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jia", "Kofi", "Lena"])
    item = rng.choice(["apples", "stickers", "marbles", "books", "pencils", "cards", "shells", "coins"])
    problems = [
        lambda: (
            f"{name} has {a + b} {item} and gives {b} to a friend, then buys {c} more. How many {item} does "
            f"{name} have now?"
        ),
        lambda: f"A shop sells {item} for {a} cents each. How much do {b * 5} {item} cost in dollars? Show your steps.",
        lambda: f"A train travels {a * b * 5} km in {b} hours. What is its average speed in km per hour?",
        lambda: f"What is {b * 5} percent of {a * 20}? Explain how you worked it out.",
        lambda: f"A rectangle is {a} cm long and {b} cm wide. What are its area and its perimeter?",
        lambda: f"Solve for x: {b}x + {a} = {b * c + a}. Check your answer.",
        lambda: f"The sum of two numbers is {2 * a + b} and their difference is {b}. What are the two numbers?",
        lambda: (
            f"A recipe needs {b * 50} grams of flour for {b * 2} pancakes. How much flour is needed for "
            f"{c * 2} pancakes?"
        ),
        lambda: f"{name} reads {b * 5} pages a day. How many days does it take to finish a book of {b * 5 * a} pages?",
        lambda: f"What is the least common multiple of {a} and {b}? Show the method you used.",
        lambda: f"A car uses {c} liters of fuel per 100 km. How many liters does it need for a {a * 50} km trip?",
        lambda: (
            f"If a number is multiplied by {b} and then {a} is added, the result is {b * c + a}. What is the number?"
        ),
        lambda: (
            f"A class has {a + 10} students and {c} of them are absent today. What fraction of the class is "
            "present? Give the answer in lowest terms."
        ),
        lambda: f"A jacket costs ${a * 5}. It is on sale for {b * 5}% off. What is the sale price?",
        lambda: f"{name} saves ${a} every week. How many weeks will it take to save ${a * (b + 10)}?",
        lambda: (
            f"A bag has {a} red and {b} blue {item}. If one is picked at random, what is the probability that it "
            "is blue?"
        ),
        lambda: f"The average of three numbers is {a}. Two of them are {a - c} and {a + b}. What is the third number?",
        lambda: (
            f"A tank holds {a * 10} liters and is filled at {b} liters per minute. How long does it take to fill "
            "from empty?"
        ),
        lambda: f"A square has a perimeter of {4 * a} meters. What is its area?",
        lambda: f"Write {a * 4}/{b * 4} as a fraction in lowest terms and as a decimal.",
        lambda: (
            f"{name} is {a} years old and {name}'s mother is {b + 2} times as old. How old will the mother be "
            f"in {c} years?"
        ),
        lambda: f"A bus leaves at 8:{10 + a} and the trip takes {b * 10} minutes. At what time does it arrive?",
        lambda: f"Round {a * 1000 + b * 37 + c} to the nearest hundred and to the nearest thousand.",
        lambda: f"Three friends share a bill of ${a * 3 + b} equally. How much does each pay, to the cent?",
    ]
    return rng.choice(problems)()


def math_prompts(count: int, seed: int = 0) -> list[dict]:
    """Arithmetic and algebra word problems (domain `math`) from templates with random numbers, all distinct."""
    rng = random.Random(f"dspark-math-{seed}")
    records: list[dict] = []
    seen: set[str] = set()
    attempts = 0
    while len(records) < count and attempts < 50 * count:  # the attempt cap only matters for absurd counts
        attempts += 1
        text = _math_problem(rng)
        if text not in seen:
            seen.add(text)
            records.append(_generated("math", len(records), "math", text))
    return records


GENERATORS: dict[str, Callable[[int, int], list[dict]]] = {
    "topics": topic_prompts,
    "code": code_prompts,
    "math": math_prompts,
}


# ======================================================================================================================
# Generator: self-instruct (the target writes new prompts)
# ======================================================================================================================

SELF_INSTRUCT_REQUEST = (
    "Here are some example requests that people send to an AI assistant:\n{examples}\n\n"
    "Write one new request on a different subject, in the same style. Reply with the request only."
)
# replies in the assistant's voice ("I'm ready to help ...") are answers to the instruction, not user requests
_ASSISTANT_VOICE = re.compile(
    r"^(i'?m (ready|here|happy|glad)|i am (ready|here|happy|glad)|i'?d (be|love)|i can help|i'll|i will|great|"
    r"what a|thank|thanks|absolutely|okay|ok\b)",
    re.IGNORECASE,
)
_LEAD_IN = re.compile(r"^(sure|certainly|of course|here('s| is)|new request|request)\b[^\n:]*:\s*", re.IGNORECASE)


def clean_generated_request(text: str) -> str:
    """A request the target wrote, without the wrapping it tends to add (lead-ins, numbering, bullets, quotes)."""
    text = _LEAD_IN.sub("", text.strip())
    text = re.sub(r"^(\d+[.)]|[-*•])\s+", "", text)
    return text.strip().strip('"“”*').strip()


def extract_generated_request(text: str, finished: bool) -> str | None:
    """The first paragraph of what the target wrote, cleaned; None if it may be cut off.

    Small targets rarely stop after the request: they go on to answer it or write another. A paragraph break shows
    that the first paragraph is complete even when the answer ran into `max_new_tokens` (`finished` False).
    """
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]
    # a lone lead-in paragraph ("Here's a new request:") introduces the request that follows it
    while paragraphs and paragraphs[0].endswith(":") and not clean_generated_request(paragraphs[0]):
        paragraphs.pop(0)
    if not paragraphs or not (finished or len(paragraphs) > 1):
        return None
    lines = paragraphs[0].split("\n")
    if len(lines) > 1 and re.match(r"\s*(\d+[.)]|[-*•])\s", lines[1]):  # a list of requests: keep the first
        paragraphs[0] = lines[0]
    request = clean_generated_request(paragraphs[0])
    return request if request and not _ASSISTANT_VOICE.match(request) else None


def self_instruct_prompts(
    target,
    tokenizer,
    count: int,
    *,
    seed: int = 0,
    batch_size: int = 32,
    max_new_tokens: int = 96,
    temperature: float = 1.0,
    top_p: float = 0.95,
    min_chars: int = 15,
    max_chars: int = 500,
    examples: Sequence[str] | None = None,
    examples_shown: int = 3,
    max_batches: int | None = None,
) -> list[dict]:
    """Prompts written by the target itself: shown a few example requests, it writes a new one (sampled).

    Batched like `generate_responses` (left padding; `torch.manual_seed(seed + batch)` before batch `batch`). The
    request is the first paragraph of each answer (`extract_generated_request`). Dropped: empty, shorter than
    `min_chars`, longer than `max_chars`, possibly cut off by `max_new_tokens`, duplicates (of each other or of the
    examples shown) and evaluation prompts. Stops after `max_batches` batches (default:
    enough for four attempts per wanted prompt) and warns if fewer than `count` survived.
    """
    from .responses import encode_prompt, generate_batch, pad_token_id_for, stop_token_ids

    if examples is None:
        examples = [r["turns"][0] for r in topic_prompts(300, seed) + code_prompts(60, seed) + math_prompts(60, seed)]
        examples = [text for text in examples if "```" not in text]  # keep the few-shot list short and one-line
    if len(examples) < examples_shown:
        raise ValueError(f"dspark: self-instruct needs at least {examples_shown} example requests.")
    chat = getattr(tokenizer, "chat_template", None) is not None
    stop_ids = stop_token_ids(target, tokenizer)
    max_batches = max_batches if max_batches is not None else -(-4 * count // batch_size)
    rng = random.Random(f"dspark-self-instruct-{seed}")
    seen = {prompt_fingerprint(text) for text in examples}
    records: list[dict] = []
    for batch_index in range(max_batches):
        if len(records) >= count:
            break
        requests = []
        for _ in range(batch_size):
            shown = "\n".join(f"{i}. {text}" for i, text in enumerate(rng.sample(list(examples), examples_shown), 1))
            if chat:
                requests.append({"turns": [SELF_INSTRUCT_REQUEST.format(examples=shown)]})
            else:  # a completion model continues a numbered list; its next line is the new request
                requests.append({"raw": f"Example requests to an AI assistant:\n{shown}\n{examples_shown + 1}."})
        prompt_ids = [encode_prompt(tokenizer, request, chat) for request in requests]
        answers = generate_batch(
            target,
            prompt_ids,
            stop_ids=stop_ids,
            pad_token_id=pad_token_id_for(tokenizer, stop_ids),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=None,
            seed=seed + batch_index,
        )
        for answer, finish_reason in answers:
            text = tokenizer.decode(answer, skip_special_tokens=True)
            if chat:
                text = extract_generated_request(text, finished=finish_reason == "eos")
            else:  # a completion model writes the list's next item; its line ends the request
                lines = text.split("\n")
                text = clean_generated_request(lines[0]) if len(lines) > 1 or finish_reason == "eos" else None
            if text is None or not min_chars <= len(text) <= max_chars:
                continue
            key = prompt_fingerprint(text)
            if key in seen:
                continue
            seen.add(key)
            record = _generated("self_instruct", len(records), "chat", text)
            if find_evaluation_leaks([record]):
                continue
            records.append(record)
    if len(records) < count:
        warnings.warn(
            f"dspark: self-instruct kept {len(records)} of {count} wanted prompts after {max_batches} batches; "
            "raise max_batches (or the sampling temperature) for more.",
            stacklevel=2,
        )
    return records[:count]


# ======================================================================================================================
# Deduplication, mixing
# ======================================================================================================================


def record_fingerprint(record: dict) -> str:
    """`prompt_fingerprint` of all turns: two records are duplicates when every user turn matches."""
    return prompt_fingerprint("\n".join(record["turns"]))


def deduplicate(records: Sequence[dict]) -> list[dict]:
    """The first occurrence of every prompt, compared up to case, whitespace and punctuation."""
    seen: set[str] = set()
    unique = []
    for record in records:
        key = record_fingerprint(record)
        if key not in seen:
            seen.add(key)
            unique.append(record)
    return unique


def mix_prompts(
    sources: Mapping[str, Sequence[dict]], counts: Mapping[str, int | None] | None = None, seed: int = 0
) -> list[dict]:
    """One deduplicated, shuffled, leak-checked training prompt list from several sources.

    `sources` maps a source name to its records; `counts` says how many to take from each (a seeded random sample;
    missing or None: all). A source with fewer records than asked gives all it has, with a warning. Duplicates
    across sources keep their first occurrence (in the order of `sources`); ids must stay unique.
    """
    counts = counts or {}
    unknown = set(counts) - set(sources)
    if unknown:
        raise ValueError(f"dspark: counts name unknown prompt sources {sorted(unknown)}; sources: {list(sources)}.")
    chosen: list[dict] = []
    for name, records in sources.items():
        records = list(records)
        wanted = counts.get(name)
        if wanted is not None and wanted < len(records):
            keep = sorted(random.Random(f"dspark-mix-{seed}-{name}").sample(range(len(records)), wanted))
            records = [records[index] for index in keep]
        elif wanted is not None and wanted > len(records):
            warnings.warn(
                f"dspark: prompt source {name!r} has only {len(records)} prompts ({wanted} asked for).", stacklevel=2
            )
        chosen.extend({**record, "source": record.get("source", name)} for record in records)
    unique = deduplicate(chosen)
    if len(unique) < len(chosen):
        warnings.warn(f"dspark: dropped {len(chosen) - len(unique)} duplicate prompts.", stacklevel=2)
    check_unique_ids(unique)
    random.Random(f"dspark-mix-{seed}").shuffle(unique)
    check_no_evaluation_leak(unique)
    return unique


def check_unique_ids(records: Sequence[dict]) -> None:
    """Raise if two records share an id: answers are cached and resumed by prompt id."""
    owners: dict[str, str] = {}
    for record in records:
        if record["id"] in owners:
            raise ValueError(
                f"dspark: two different prompts share the id {record['id']!r} (sources {owners[record['id']]!r} "
                f"and {record.get('source')!r}). Give them distinct `id` fields, or rename one of the files."
            )
        owners[record["id"]] = record.get("source", "?")


def parse_source_spec(spec: str) -> tuple[str, str]:
    """`topics:2000` -> ("topics", "2000"); `file:my.jsonl` -> ("file", "my.jsonl"); validates the kind and count."""
    kind, separator, value = spec.partition(":")
    kinds = [*GENERATORS, "self_instruct"]
    if kind == "file" and separator and value:
        return kind, value
    if kind in kinds and separator and value.isdigit() and int(value) > 0:
        return kind, value
    raise ValueError(
        f"dspark: bad prompt source {spec!r}; use {', '.join(f'{name}:COUNT' for name in kinds)} or file:PATH."
    )


def build_prompts(specs: Sequence[str], seed: int = 0, *, target=None, tokenizer=None) -> list[dict]:
    """Training prompts from source specs (see `parse_source_spec`), mixed by `mix_prompts`.

    `self_instruct:COUNT` needs the target and its tokenizer; the other generators and files do not.
    """
    sources: dict[str, list[dict]] = {}
    counts: dict[str, int | None] = {}
    for spec in specs:
        kind, value = parse_source_spec(spec)
        if spec in sources:
            raise ValueError(f"dspark: prompt source {spec!r} is given twice.")
        if kind == "file":
            sources[spec], counts[spec] = load_prompt_file(value), None
        elif kind == "self_instruct":
            if target is None or tokenizer is None:
                raise ValueError("dspark: the self_instruct prompt source needs the target and its tokenizer.")
            sources[spec] = self_instruct_prompts(target, tokenizer, int(value), seed=seed)
            counts[spec] = int(value)
        else:
            sources[spec], counts[spec] = GENERATORS[kind](int(value), seed), int(value)
    return mix_prompts(sources, counts, seed)


# ======================================================================================================================
# Evaluation leak check
# ======================================================================================================================


def _normalized(text: str) -> str:
    """The canonical text `prompt_fingerprint` hashes: lower case, runs of non-word characters become one space."""
    return re.sub(r"[\W_]+", " ", text.lower()).strip()


@functools.lru_cache(maxsize=1)
def _evaluation_index() -> tuple[dict[str, str], dict[str, tuple[tuple[str, str], ...]]]:
    """(fingerprint -> evaluation id, first 40 normalised chars -> ((normalised text, evaluation id), ...)).

    The second map finds an evaluation prompt inside a training prompt with one dictionary lookup per word start of
    the training prompt, instead of one substring search per evaluation prompt.
    """
    exact: dict[str, str] = {}
    by_head: dict[str, list[tuple[str, str]]] = {}
    for name in BUILTIN_PROMPT_SETS:
        for record in load_prompt_set(name):
            for text in {*record["turns"], record["raw"]}:
                normal = _normalized(text)
                exact[hashlib.sha256(normal.encode()).hexdigest()] = record["id"]
                if len(normal) >= MIN_EMBEDDED_LEAK_CHARS:
                    by_head.setdefault(normal[:MIN_EMBEDDED_LEAK_CHARS], []).append((normal, record["id"]))
    return exact, {head: tuple(entries) for head, entries in by_head.items()}


def _embedded_evaluation_id(normal: str, by_head: dict[str, tuple[tuple[str, str], ...]]) -> str | None:
    """The id of an evaluation prompt found inside `normal` (starting at a word boundary), if any."""
    width = MIN_EMBEDDED_LEAK_CHARS
    for start in [0, *(match.end() for match in re.finditer(" ", normal))]:
        if len(normal) - start < width:
            break
        for evaluation_text, evaluation_id in by_head.get(normal[start : start + width], ()):
            if normal.startswith(evaluation_text, start):
                return evaluation_id
    return None


def find_evaluation_leaks(records: Sequence[dict]) -> list[tuple[str, str]]:
    """(training id, evaluation id) for every training prompt that is, or contains, an evaluation prompt.

    Compared texts: every turn and the raw form on both sides, up to case, whitespace and punctuation. "Contains"
    applies to evaluation prompts of at least `MIN_EMBEDDED_LEAK_CHARS` normalised characters.
    """
    exact, by_head = _evaluation_index()
    leaks = []
    for record in records:
        texts = [*record.get("turns", []), record.get("raw", "")]
        for text in dict.fromkeys(text for text in texts if text):
            normal = _normalized(text)
            hit = exact.get(hashlib.sha256(normal.encode()).hexdigest()) or _embedded_evaluation_id(normal, by_head)
            if hit is not None:
                leaks.append((record["id"], hit))
                break
    return leaks


def check_no_evaluation_leak(records: Sequence[dict]) -> None:
    """Raise ValueError naming the training and evaluation ids if any training prompt is (or contains) an MT-bench,
    HumanEval or MMATH prompt."""
    leaks = find_evaluation_leaks(records)
    if leaks:
        shown = ", ".join(f"{train_id} = {evaluation_id}" for train_id, evaluation_id in leaks[:10])
        more = f", and {len(leaks) - 10} more" if len(leaks) > 10 else ""
        raise ValueError(
            f"dspark: {len(leaks)} training prompts are (or contain) evaluation prompts: {shown}{more} "
            "(training id = evaluation id). Training on them would inflate every acceptance number measured on "
            "MT-bench, HumanEval and MMATH; remove them from the training prompts."
        )
