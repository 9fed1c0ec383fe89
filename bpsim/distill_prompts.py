"""Instruction prompts for distilling a draft, written for this project.

They cover the kinds of request that chat suites hold (writing, roleplay, reasoning, math,
coding, extraction, science, humanities) but none is taken from MT-Bench or HumanEval; a test
checks that no prompt shares an 8-word sequence with either suite.
"""

from __future__ import annotations

import random

TOPICS = [
    "photosynthesis", "the French Revolution", "black holes", "compound interest", "volcanoes",
    "the immune system", "machine learning", "climate change", "the Roman Empire", "jazz music",
    "renewable energy", "the water cycle", "plate tectonics", "vaccines", "the stock market",
    "ancient Egypt", "quantum computing", "coral reefs", "the printing press", "sleep",
    "inflation", "electric cars", "the human brain", "bees and pollination", "the Silk Road",
    "public libraries", "urban gardening", "the Moon landing", "earthquakes", "chess strategy",
    "nutrition for athletes", "recycling plastics", "the Internet", "democracy", "supply chains",
    "ocean tides", "the Renaissance", "antibiotics", "solar panels", "time management",
    "remote work", "baking bread", "the history of tea", "marathon training", "password security",
    "rainforests", "the theory of evolution", "minimalism", "museums", "wind turbines",
    "dinosaurs", "the periodic table", "language learning", "cloud computing", "public speaking",
    "meditation", "the Industrial Revolution", "glaciers", "microbes in soil", "photography",
    "sustainable fashion", "the Olympic Games", "3D printing", "bird migration", "budgeting",
    "the Great Wall of China", "batteries", "mental health at work", "coffee farming", "robots",
    "the speed of light", "folk tales", "mountain hiking", "open source software", "honey",
    "traffic congestion", "the origins of writing", "desert ecosystems", "team sports", "volunteering",
]

WRITING = [
    "Write a short blog post about {topic}.",
    "Explain {topic} to a ten-year-old.",
    "Give me five interesting facts about {topic}.",
    "Write a short poem about {topic}.",
    "Summarize the main ideas behind {topic} in one paragraph.",
    "What are the advantages and disadvantages of {topic}?",
    "Write a persuasive paragraph arguing that schools should teach more about {topic}.",
    "Describe a common misconception about {topic} and correct it.",
    "Write a short story in which a character discovers something surprising about {topic}.",
    "Compose a friendly email inviting a colleague to a talk on {topic}.",
    "List three questions a student might ask about {topic}, and answer each briefly.",
    "How has {topic} changed over the last hundred years?",
    "Pretend you are a tour guide and introduce {topic} to visitors.",
    "Write a product description for a board game themed around {topic}.",
    "What would a beginner need to know before studying {topic}?",
    "Draft an outline for a presentation on {topic}.",
    "Explain why {topic} matters for everyday life.",
    "Write a dialogue between a teacher and a student about {topic}.",
    "Describe {topic} using a simple analogy.",
    "Give a step-by-step explanation of how {topic} works.",
    "Write a haiku about {topic} and explain its imagery.",
    "What careers are connected to {topic}?",
    "Write a news headline and a short report about a new discovery in {topic}.",
    "Compare {topic} with {other}, noting similarities and differences.",
    "Write a limerick that mentions both {topic} and {other}.",
]

REASONING = [
    "A shop sells pencils at {a} cents each. How much do {b} pencils cost in dollars? Show your steps.",
    "If a train travels {a} kilometers in {b} hours, what is its average speed?",
    "What is {a} multiplied by {b}? Explain how you computed it.",
    "A rectangle is {a} meters long and {b} meters wide. What are its area and perimeter?",
    "Tom has {a} apples and gives away {b}. Then he buys twice as many as he has left. How many apples does he have now?",
    "Is {a} a prime number? Explain your reasoning.",
    "What is the sum of all whole numbers from 1 to {a}?",
    "Convert {a} degrees Celsius to Fahrenheit and explain the formula.",
    "A class has {a} students and {b} of them wear glasses. What percentage wear glasses?",
    "Solve for x: {a}x + {b} = {c}.",
    "If you save {a} dollars every week, how long does it take to save {c} dollars?",
    "Three friends share {c} marbles so that the first gets {a} more than the second and the third gets {b}. How many does each get?",
]

CODING = [
    "Write a Python function that counts the vowels in a string.",
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "Write a Python function that checks whether a word reads the same backwards, ignoring case.",
    "Write a Python function that merges two sorted lists into one sorted list.",
    "Write a Python function that removes duplicate items from a list while keeping their order.",
    "Write a Python function that converts a Roman numeral to an integer.",
    "Write a Python class for a simple bank account with deposit and withdraw methods.",
    "Write a Python function that reads a CSV file and returns the average of one column.",
    "Write a Python function that flattens a nested list of any depth.",
    "Write a Python function that counts how often each word occurs in a text.",
    "Write a Python function that returns the largest and smallest number in a list without using max or min.",
    "Write a Python function that checks whether two strings are anagrams.",
    "Write a Python function that computes the greatest common divisor of two integers.",
    "Write a Python function that transposes a matrix given as a list of lists.",
    "Write a Python function that validates an email address with a regular expression.",
    "Explain the difference between a list and a tuple in Python, with examples.",
    "Explain what a Python decorator is and write a small example that times a function.",
    "Write a SQL query that finds the ten customers with the highest total order value.",
    "Write a JavaScript function that debounces another function.",
    "Explain what recursion is and give a short example in Python.",
    "Write a Python generator that yields the prime numbers below a limit.",
    "Write a bash command that counts the lines in every .txt file of a folder.",
    "Explain the time complexity of binary search and write it in Python.",
    "Write a Python function that groups a list of words by their first letter.",
    "Write a Python function that rotates a list by k positions.",
    "Explain how a hash table works and when to use one.",
    "Write a Python script that prints a multiplication table from 1 to 9.",
    "Write a Python function that parses a date string like 2024-03-15 and returns the weekday.",
    "Explain the difference between a process and a thread.",
    "Write a Python function that compresses a string by counting repeated characters.",
]

EXTRACTION = [
    "Extract the names of all cities from this text: 'Last spring Maria flew from {city1} to {city2}, then took a train to {city3}.'",
    "Turn this sentence into a JSON object with keys name, age and city: '{name} is {a} years old and lives in {city1}.'",
    "Classify the sentiment of this review as positive, negative or neutral: 'The {item} arrived late, but it works {quality}.'",
    "Rewrite this sentence in a formal tone: 'hey, the {item} thing is kinda broken, can u fix it?'",
    "Correct the grammar in this sentence: '{name} have went to {city1} yesterday and buyed a {item}.'",
    "Translate into simple English: 'The {item} shall be returned within {a} days of purchase.'",
]

ROLEPLAY = [
    "You are a {role}. Give advice to someone who wants to learn about {topic}.",
    "Act as a {role} and describe a typical day at work.",
    "Pretend to be a {role} and answer: what is the hardest part of your job?",
    "As a {role}, write a short motivational message for a new trainee.",
]

ROLES = ["chef", "astronaut", "museum curator", "park ranger", "software engineer", "librarian",
         "marine biologist", "football coach", "pilot", "nurse", "carpenter", "travel writer"]
CITIES = ["Lisbon", "Nairobi", "Osaka", "Toronto", "Lima", "Oslo", "Hanoi", "Cairo", "Perth", "Krakow"]
NAMES = ["Aisha", "Ben", "Chen", "Dario", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas"]
ITEMS = ["blender", "laptop", "bicycle", "lamp", "backpack", "kettle", "printer", "tent"]
QUALITIES = ["perfectly", "poorly", "fine", "only sometimes"]


def distill_prompts(count: int = 2400, seed: int = 0) -> list[str]:
    """Return ``count`` distinct instruction prompts, reproducible from ``seed``."""
    rng = random.Random(seed)
    prompts: list[str] = list(CODING)
    seen = set(prompts)
    kinds = [(WRITING, 0.55), (REASONING, 0.15), (EXTRACTION, 0.1), (ROLEPLAY, 0.2)]
    attempts = 0
    while len(prompts) < count:
        attempts += 1
        if attempts > count * 50:
            raise ValueError(f"cannot build {count} distinct prompts from the templates; ask for fewer")
        templates = rng.choices([k for k, _ in kinds], weights=[w for _, w in kinds])[0]
        topic, other = rng.sample(TOPICS, 2)
        a, b = rng.randint(2, 60), rng.randint(2, 30)
        text = rng.choice(templates).format(
            topic=topic, other=other, a=a, b=b, c=a * rng.randint(2, 9) + b, role=rng.choice(ROLES),
            city1=rng.choice(CITIES), city2=rng.choice(CITIES), city3=rng.choice(CITIES),
            name=rng.choice(NAMES), item=rng.choice(ITEMS), quality=rng.choice(QUALITIES),
        )
        if text not in seen:
            seen.add(text)
            prompts.append(text)
    rng.shuffle(prompts)
    return prompts[:count]
