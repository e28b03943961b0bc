"""Training prompts: user files in common formats, generators shipped with the package, and the evaluation leak check.

Every source returns records in the schema of `dspark.evaluation.prompt_sets` (id, domain, turns, raw). Generators
are deterministic for a seed and need no network: no public instruction dataset is reachable offline, and on-policy
training only needs prompts; the target writes the answers (`dspark.train.responses`).
"""

from __future__ import annotations

import inspect
import json
import random
import re
from pathlib import Path

from ..evaluation.prompt_sets import evaluation_fingerprints, load_prompt_set, normalize_record, prompt_fingerprint

# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------


def _chat_turns(item: dict) -> dict:
    """ShareGPT `conversations` (from/value) and instruction/input records -> our schema's fields."""
    if "conversations" in item:
        turns = [m.get("value", "") for m in item["conversations"] if m.get("from") in ("human", "user")]
        return {**item, "turns": turns}
    if "instruction" in item:
        text = item["instruction"] + (f"\n\n{item['input']}" if item.get("input") else "")
        return {**item, "turns": [text]}
    return item


def load_prompt_file(path: str | Path) -> list[dict]:
    """Prompts from a .jsonl file (one object per line) or a .json file (a list of objects).

    Accepted records: {"prompt": ...}, {"turns": [...]}, {"messages": [{"role", "content"}...]},
    {"conversations": [{"from", "value"}...]} (ShareGPT), {"instruction", "input"} (Alpaca).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dspark: prompt file {path} does not exist.")
    if path.suffix == ".json":
        try:
            items = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"dspark: {path} is not valid JSON ({error.msg}, line {error.lineno}).") from None
        if not isinstance(items, list):
            raise ValueError(f"dspark: {path} must hold a JSON list of prompt records.")
        located = [(item, f"{path}[{index}]") for index, item in enumerate(items)]
    else:
        located = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                located.append((json.loads(line), f"{path}:{number}"))
            except json.JSONDecodeError as error:
                raise ValueError(f"dspark: {path}:{number} is not valid JSON ({error.msg}).") from None
    records = []
    for index, (item, where) in enumerate(located):
        if isinstance(item, dict):
            item = _chat_turns(item)
        records.append(normalize_record(item, "chat", f"{path.stem}/{index}", where))
    if not records:
        raise ValueError(f"dspark: prompt file {path} holds no prompts.")
    return records


# ----------------------------------------------------------------------------------------------------------------
# Generators
# ----------------------------------------------------------------------------------------------------------------

TOPICS = """photosynthesis; black holes; the water cycle; plate tectonics; volcanoes; the immune system; vaccines;
DNA replication; climate change; renewable energy; solar panels; wind turbines; electric cars; batteries; the
internet; how search engines work; encryption; passwords; cloud computing; machine learning; neural networks; the
history of computers; the printing press; the Roman Empire; ancient Egypt; the Silk Road; the Renaissance; the
Industrial Revolution; the French Revolution; the Cold War; the moon landing; the Olympic Games; chess; football;
basketball; marathon training; yoga; meditation; sleep; healthy breakfasts; vegetarian cooking; baking bread;
making pasta; coffee; tea; chocolate; spices; gardening; houseplants; composting; bees; birds; whales; dolphins;
elephants; cats; dogs; rainforests; deserts; coral reefs; mountains; rivers; oceans; weather forecasts;
hurricanes; earthquakes; recycling; plastic pollution; public transport; city planning; bicycles; trains;
airplanes; rockets; satellites; the solar system; Mars; stars; telescopes; microscopes; electricity; magnets;
light; sound; music theory; learning the guitar; the piano; painting; photography; film making; writing poetry;
writing a novel; public speaking; job interviews; writing a resume; saving money; budgeting; investing basics;
starting a small business; marketing; customer service; teamwork; leadership; time management; procrastination;
learning a new language; studying for exams; online courses; libraries; museums; travel to Japan; travel to
Italy; camping; hiking safety; first aid; fire safety; moving to a new city; making friends; family traditions;
birthdays; holidays; volunteering; pets; board games; video games; social media; smartphones; privacy online;
fake news; critical thinking; logic puzzles; probability; statistics; geometry; algebra; prime numbers;
fractions; percentages; interest rates; inflation; supply and demand; taxes; democracy; human rights; the
scientific method; famous inventors; Marie Curie; Isaac Newton; Albert Einstein; Ada Lovelace; Leonardo da
Vinci; Shakespeare; mythology; dinosaurs; fossils; evolution; genetics; nutrition; vitamins; exercise; running
shoes; architecture; bridges; skyscrapers; robots; 3D printing; virtual reality; open source software; databases;
spreadsheets; email etiquette; remote work; productivity apps; minimalism; fashion; recipes for beginners""".replace(
    "\n", " "
)

TASK_TEMPLATES = [
    "Explain {topic} to a ten-year-old.",
    "Give me three interesting facts about {topic}.",
    "Write a short story that involves {topic}.",
    "Write a haiku about {topic}.",
    "What are the most common misconceptions about {topic}?",
    "Summarize the key ideas of {topic} in five bullet points.",
    "Write a friendly email inviting a colleague to a talk about {topic}.",
    "Give three practical tips related to {topic}.",
    "What questions should a beginner ask about {topic}?",
    "Describe the history of {topic} in a short paragraph.",
    "Write a short dialogue between a teacher and a student about {topic}.",
    "List the pros and cons of {topic}.",
    "How would you explain {topic} in a job interview?",
    "Write a tweet announcing a new podcast episode about {topic}.",
    "Create a short quiz with three questions about {topic}, with answers.",
    "Why does {topic} matter in everyday life?",
    "Write an opening paragraph for a blog post about {topic}.",
    "Compare {topic} and {other} in a few sentences.",
    "What is the connection between {topic} and {other}?",
    "Write a limerick about {topic}.",
    "Suggest a weekend project related to {topic}.",
    "Describe {topic} using a simple analogy.",
    "Write a product description for a book about {topic}.",
    "What are three careers connected to {topic}?",
    "Plan a one-hour lesson about {topic}.",
]

CODE_TASKS = """reverse a string; check whether a string is a palindrome; count the vowels in a string; find the largest
number in a list; compute the factorial of n; compute the n-th Fibonacci number; check whether a number is prime;
list the prime numbers below n; compute the greatest common divisor of two numbers; merge two sorted lists; remove
duplicates from a list while keeping order; flatten a nested list; count word frequencies in a text; find the
second largest element of a list; rotate a list by k positions; check whether two strings are anagrams; convert
Celsius to Fahrenheit; convert a decimal number to binary; sum the digits of an integer; find the longest word in
a sentence; capitalize the first letter of every word; compute the average of a list of numbers; find the median
of a list; transpose a matrix; multiply two matrices; implement binary search; implement bubble sort; implement
insertion sort; implement merge sort; implement quicksort; validate an email address with a regular expression;
parse a CSV line into fields; read a text file and count its lines; group a list of words by their first letter;
compute the running sum of a list; check whether brackets in a string are balanced; convert a Roman numeral to an
integer; convert an integer to a Roman numeral; compute the power set of a list; generate all permutations of a
string; find the intersection of two lists; compute the dot product of two vectors; normalize a list of numbers to
sum to one; implement a stack class; implement a queue class; implement a simple linked list; count the
occurrences of each character; compress a string with run-length encoding; decode a run-length encoded string;
find the missing number in a list from 1 to n; check whether a year is a leap year; compute the number of days
between two dates; format a number with thousands separators; split a list into chunks of size k; find the most
common element of a list; compute the Levenshtein distance between two strings; simulate rolling two dice;
shuffle a list without using random.shuffle; compute compound interest; convert a dictionary to a JSON string;
sort a list of dictionaries by a key; build a word index mapping words to line numbers""".replace("\n", " ")

CODE_TEMPLATES = [
    "Write a Python function to {task}.",
    "Write a Python function to {task}. Include a docstring and two examples.",
    "How do I {task} in Python? Show the code and explain it briefly.",
    "Write a Python function to {task}, then write two unit tests for it.",
    "Explain step by step how to {task} in Python.",
    "Write an efficient Python solution to {task} and state its time complexity.",
]

MATH_TEMPLATES = [
    "A shop sells pencils for {a} cents each. How much do {b} pencils cost in dollars? Explain your steps.",
    "Tom has {a} marbles and gives {b} to his friend. Then he buys {c} more. How many marbles does he have?",
    "A train travels {a} km in {b} hours. What is its average speed in km per hour?",
    "What is {a} percent of {c}? Show your work.",
    "A rectangle is {a} cm long and {b} cm wide. What are its area and perimeter?",
    "Solve for x: {b}x + {a} = {c}.",
    "The sum of two numbers is {c} and their difference is {a}. What are the numbers?",
    "A recipe needs {a} grams of flour for {b} cookies. How much flour is needed for {c} cookies?",
    "Anna reads {a} pages a day. How many days does she need for a book of {c} pages?",
    "What is the least common multiple of {a} and {b}?",
    "A car uses {a} liters of fuel per 100 km. How much fuel does it need for {c} km?",
    "If a number is multiplied by {b} and then {a} is added, the result is {c}. What is the number?",
    "A class has {c} students and {a} of them are absent. What fraction of the class is present?",
    "Compute {a} times {b}, then subtract {c}. Explain each step.",
]


def _split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(";") if item.strip()]


def _record(source: str, index: int, domain: str, text: str) -> dict:
    return {"id": f"{source}/{index}", "domain": domain, "turns": [text], "raw": text, "source": f"dspark:{source}"}


def topic_prompts(count: int, seed: int = 0) -> list[dict]:
    """General chat, knowledge and writing prompts: a topic list crossed with task templates."""
    topics = _split_list(TOPICS)
    rng = random.Random(f"topics-{seed}")
    combinations = [(template, topic) for template in TASK_TEMPLATES for topic in topics]
    rng.shuffle(combinations)
    records = []
    for index, (template, topic) in enumerate(combinations[:count]):
        other = rng.choice([t for t in topics if t != topic])
        records.append(_record("topics", index, "chat", template.format(topic=topic, other=other)))
    return records


def stdlib_function_tasks(limit: int = 300) -> list[str]:
    """'Write a Python function that <first docstring line>' from documented functions of some stdlib modules."""
    import itertools
    import math
    import statistics
    import string
    import textwrap

    tasks = []
    for module in (math, statistics, string, textwrap, itertools):
        for name, function in inspect.getmembers(module, callable):
            doc = inspect.getdoc(function) or ""
            first = doc.split("\n")[0].strip().rstrip(".")
            if name.startswith("_") or len(first) < 15 or "(" in first[:1]:
                continue
            tasks.append(
                f"Write a Python function `{name}` that does the following without using the "
                f"`{module.__name__}` module: {first[0].lower() + first[1:]}."
            )
    return tasks[:limit]


def code_prompts(count: int, seed: int = 0) -> list[dict]:
    """Python coding prompts: task list x templates, plus re-implementations of documented stdlib functions."""
    rng = random.Random(f"code-{seed}")
    pool = [template.format(task=task) for template in CODE_TEMPLATES for task in _split_list(CODE_TASKS)]
    pool += stdlib_function_tasks()
    rng.shuffle(pool)
    return [_record("code", index, "code", text) for index, text in enumerate(pool[:count])]


def math_prompts(count: int, seed: int = 0) -> list[dict]:
    """Arithmetic and algebra word problems from templates with random numbers."""
    rng = random.Random(f"math-{seed}")
    records, seen = [], set()
    while len(records) < count and len(seen) < count * 20:
        a, b = rng.randint(2, 60), rng.randint(2, 12)
        c = rng.randint(a + b + 1, 400)
        text = rng.choice(MATH_TEMPLATES).format(a=a, b=b, c=c)
        if text not in seen:
            seen.add(text)
            records.append(_record("math", len(records), "math", text))
    return records


GENERATORS = {"topics": topic_prompts, "code": code_prompts, "math": math_prompts}


def self_instruct_prompts(
    target, tokenizer, count: int, seed: int = 0, batch_size: int = 64, max_new_tokens: int = 64
) -> list[dict]:
    """Prompts written by the target itself: shown a few example requests, it writes a new one (sampled, T=1)."""
    import torch

    examples = [r["turns"][0] for r in topic_prompts(200, seed) + code_prompts(100, seed) + math_prompts(100, seed)]
    rng = random.Random(f"self-instruct-{seed}")
    records: list[dict] = []
    seen: set[str] = set()
    attempts = 0
    while len(records) < count and attempts < 4 * count:
        batch = []
        for _ in range(batch_size):
            shown = "\n".join(f"- {text}" for text in rng.sample(examples, 3))
            request = (
                f"Here are some example requests a user might send to an assistant:\n{shown}\n"
                "Write one new, different request of the same kind. Reply with the request only."
            )
            batch.append(
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": request}], tokenize=False, add_generation_prompt=True
                )
            )
        attempts += batch_size
        tokenizer.padding_side = "left"
        encoded = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(target.device)
        torch.manual_seed(seed * 7919 + attempts)
        with torch.no_grad():
            out = target.generate(**encoded, do_sample=True, temperature=1.0, top_p=0.95, max_new_tokens=max_new_tokens)
        for row in out[:, encoded["input_ids"].shape[1] :]:
            text = tokenizer.decode(row, skip_special_tokens=True).strip().strip('"').lstrip("- ").strip()
            key = prompt_fingerprint(text)
            if 15 <= len(text) <= 400 and key not in seen:
                seen.add(key)
                records.append(_record("self_instruct", len(records), "chat", text))
    return records[:count]


# ----------------------------------------------------------------------------------------------------------------
# Mixing, deduplication, leak check
# ----------------------------------------------------------------------------------------------------------------


def deduplicate(records: list[dict]) -> list[dict]:
    """First occurrence of every prompt (compared by `prompt_fingerprint` of the first turn)."""
    seen, unique = set(), []
    for record in records:
        key = prompt_fingerprint(record["turns"][0])
        if key not in seen:
            seen.add(key)
            unique.append(record)
    return unique


def _normalized(text: str) -> str:
    return re.sub(r"[\W_]+", " ", text.lower()).strip()


def find_evaluation_leaks(records: list[dict], min_substring: int = 40) -> list[tuple[str, str]]:
    """(training id, evaluation id) pairs where a training prompt equals an evaluation prompt (any turn, up to case,
    whitespace and punctuation) or contains one of at least `min_substring` normalised characters."""
    fingerprints = evaluation_fingerprints()
    long_texts = []
    for name in ("mt_bench", "humaneval", "mmath_en"):
        for record in load_prompt_set(name):
            for text in {*record["turns"], record["raw"]}:
                normal = _normalized(text)
                if len(normal) >= min_substring:
                    long_texts.append((normal, record["id"]))
    leaks = []
    for record in records:
        for turn in record["turns"]:
            hit = fingerprints.get(prompt_fingerprint(turn))
            if hit is None:
                normal = _normalized(turn)
                hit = next(
                    (eval_id for text, eval_id in long_texts if len(normal) >= len(text) and text in normal), None
                )
            if hit is not None:
                leaks.append((record["id"], hit))
                break
    return leaks


def check_no_evaluation_leak(records: list[dict]) -> None:
    """Raise if any training prompt is (or contains) an MT-bench, HumanEval or MMATH prompt."""
    leaks = find_evaluation_leaks(records)
    if leaks:
        shown = ", ".join(f"{train} = {evaluation}" for train, evaluation in leaks[:5])
        more = ", ..." if len(leaks) > 5 else ""
        raise ValueError(
            f"dspark: {len(leaks)} training prompts are evaluation prompts ({shown}{more})."
            " Training on them would inflate every published acceptance number; remove them from the training data."
        )


def build_prompts(sources: list[str], seed: int = 0) -> list[dict]:
    """Prompts from `name:count` generator specs (topics, code, math) and `file:PATH` specs, deduplicated, shuffled
    deterministically and checked for evaluation leaks."""
    records = []
    for spec in sources:
        kind, _, value = spec.partition(":")
        if kind == "file":
            records.extend(load_prompt_file(value))
        elif kind in GENERATORS:
            if not value.isdigit():
                raise ValueError(f"dspark: prompt source {spec!r} needs a count, e.g. {kind}:1000")
            made = GENERATORS[kind](int(value), seed)
            if len(made) < int(value):
                print(f"dspark: the {kind} generator has only {len(made)} distinct prompts (asked for {value})")
            records.extend(made)
        else:
            raise ValueError(
                f"dspark: unknown prompt source {spec!r}; use {', '.join(f'{g}:COUNT' for g in GENERATORS)} "
                "or file:PATH (self-instruct prompts need the target: `dspark data self-instruct`)."
            )
    records = deduplicate(records)
    random.Random(f"mix-{seed}").shuffle(records)
    check_no_evaluation_leak(records)
    return records
