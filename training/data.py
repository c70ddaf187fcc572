"""Writes the adapters' datasets: `python -m training.data` (fixed seed, no downloads).

Each task gets `data/<task>.train.jsonl` and `data/<task>.heldout.jsonl`, one
`{"event": ..., "answer": ...}` per line: the event the example function receives and the
answer its adapter should give. Held-out examples use phrasings (sql), stories (summarize)
and customer messages (support) that never occur in training, so the held-out metrics
measure what the adapter learnt, not what it memorised. `data/schema.sql` is the database
the sql examples query (the held-out metric parses answers against it).
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable, Iterator
from typing import Any

from training import DATA

SEED = 1234
N_TRAIN = 320
N_HELDOUT = 40

SCHEMA_SQL = """\
CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, city TEXT, country TEXT, signup_date DATE);
CREATE TABLE products (id INTEGER PRIMARY KEY, name TEXT, category TEXT, price REAL);
CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER, order_date DATE, status TEXT, total REAL);
CREATE TABLE order_items (order_id INTEGER, product_id INTEGER, quantity INTEGER, unit_price REAL);
CREATE TABLE employees (id INTEGER PRIMARY KEY, name TEXT, department TEXT, salary REAL, hire_date DATE);
"""
TABLES = {
    "customers": "customers(id, name, city, country, signup_date)",
    "products": "products(id, name, category, price)",
    "orders": "orders(id, customer_id, order_date, status, total)",
    "order_items": "order_items(order_id, product_id, quantity, unit_price)",
    "employees": "employees(id, name, department, salary, hire_date)",
}
CITIES = ["Paris", "Berlin", "Madrid", "Rome", "Lisbon", "Vienna", "Oslo", "Dublin", "Prague", "Warsaw",
          "Boston", "Denver", "Austin", "Seattle", "Toronto", "Sydney"]
COUNTRIES = ["France", "Germany", "Spain", "Italy", "Portugal", "Austria", "Norway", "Ireland",
             "Canada", "Australia", "Japan", "Brazil"]
CATEGORIES = ["books", "toys", "garden", "kitchen", "sports", "music", "office", "electronics"]
STATUSES = ["shipped", "pending", "cancelled", "delivered", "returned"]
DEPARTMENTS = ["sales", "marketing", "engineering", "support", "finance", "legal"]
PRODUCTS = ["desk lamp", "yoga mat", "coffee grinder", "chess set", "rain jacket", "office chair",
            "water bottle", "board game", "bread knife", "garden hose"]


def _sql_templates() -> list[tuple[list[str], str, list[str]]]:
    """(phrasings, query, tables): the last phrasing of each is held out."""
    return [
        (["How many customers live in {city}?", "Count the customers based in {city}.",
          "What is the number of customers from the city of {city}?"],
         "SELECT COUNT(*) FROM customers WHERE city = '{city}';", ["customers"]),
        (["List the names of products in the {cat} category.", "Which products are in {cat}?",
          "Show every product name whose category is {cat}."],
         "SELECT name FROM products WHERE category = '{cat}';", ["products"]),
        (["What is the average price of {cat} products?", "Give the mean price of products in {cat}.",
          "On average, how much does a product in the {cat} category cost?"],
         "SELECT AVG(price) FROM products WHERE category = '{cat}';", ["products"]),
        (["Show the {k} most expensive products.", "Which {k} products have the highest price?",
          "List the top {k} products by price."],
         "SELECT name, price FROM products ORDER BY price DESC LIMIT {k};", ["products"]),
        (["How many orders has each customer placed?", "Count the orders per customer.",
          "For every customer, give the number of orders they made."],
         "SELECT c.name, COUNT(o.id) FROM customers c JOIN orders o ON o.customer_id = c.id GROUP BY c.id;",
         ["customers", "orders"]),
        (["What is the total of all {status} orders?", "Sum the totals of orders with status {status}.",
          "How much revenue comes from orders that are {status}?"],
         "SELECT SUM(total) FROM orders WHERE status = '{status}';", ["orders"]),
        (["Which employees in {dept} earn more than {n}?", "List {dept} employees with a salary above {n}.",
          "Name the people in the {dept} department paid over {n}."],
         "SELECT name FROM employees WHERE department = '{dept}' AND salary > {n};", ["employees"]),
        (["Which customers signed up after {date}?", "List customers who joined after {date}.",
          "Give the names of customers whose signup date is later than {date}."],
         "SELECT name FROM customers WHERE signup_date > '{date}';", ["customers"]),
        (["How many orders were placed in {year}?", "Count the orders from {year}.",
          "What number of orders have an order date in {year}?"],
         "SELECT COUNT(*) FROM orders WHERE strftime('%Y', order_date) = '{year}';", ["orders"]),
        (["What is the highest salary in {dept}?", "Find the top salary of the {dept} department.",
          "How much does the best-paid person in {dept} earn?"],
         "SELECT MAX(salary) FROM employees WHERE department = '{dept}';", ["employees"]),
        (["Which customers from {country} placed an order over {n}?",
          "List customers in {country} with an order total above {n}.",
          "Name the {country} customers who have spent more than {n} on a single order."],
         "SELECT DISTINCT c.name FROM customers c JOIN orders o ON o.customer_id = c.id "
         "WHERE c.country = '{country}' AND o.total > {n};", ["customers", "orders"]),
        (["How many products cost less than {n}?", "Count the products priced under {n}.",
          "What is the number of products cheaper than {n}?"],
         "SELECT COUNT(*) FROM products WHERE price < {n};", ["products"]),
        (["Which categories have more than {k} products?", "List categories with over {k} products.",
          "Find every product category that contains more than {k} items."],
         "SELECT category FROM products GROUP BY category HAVING COUNT(*) > {k};", ["products"]),
        (["How many units of the {product} were sold?", "What is the total quantity sold of {product}?",
          "Sum the quantities ordered of the product called {product}."],
         "SELECT SUM(oi.quantity) FROM order_items oi JOIN products p ON p.id = oi.product_id "
         "WHERE p.name = '{product}';", ["order_items", "products"]),
        (["Which {k} cities have the most customers?", "Top {k} cities by number of customers.",
          "List the {k} cities where most of our customers live."],
         "SELECT city, COUNT(*) AS n FROM customers GROUP BY city ORDER BY n DESC LIMIT {k};", ["customers"]),
        (["How many employees were hired in {year}?", "Count the hires of {year}.",
          "What number of employees have a hire date in {year}?"],
         "SELECT COUNT(*) FROM employees WHERE strftime('%Y', hire_date) = '{year}';", ["employees"]),
    ]


def _slots(rng: random.Random) -> dict[str, Any]:
    return {"city": rng.choice(CITIES), "cat": rng.choice(CATEGORIES), "k": rng.randint(2, 10),
            "status": rng.choice(STATUSES), "dept": rng.choice(DEPARTMENTS),
            "n": rng.choice([50, 100, 200, 500, 1000, 50000, 80000]),
            "date": f"{rng.randint(2019, 2025)}-{rng.randint(1, 12):02d}-01",
            "year": str(rng.randint(2018, 2025)), "country": rng.choice(COUNTRIES),
            "product": rng.choice(PRODUCTS)}


def sql_examples(rng: random.Random, heldout: bool) -> Iterator[dict[str, Any]]:
    templates = _sql_templates()
    while True:
        phrasings, query, tables = rng.choice(templates)
        phrasing = phrasings[-1] if heldout else rng.choice(phrasings[:-1])
        slots = _slots(rng)
        # The schema lists the tables a question needs and, often, one it does not.
        names = list(tables)
        if rng.random() < 0.5:
            names.append(rng.choice([t for t in TABLES if t not in names]))
        rng.shuffle(names)
        yield {"event": {"question": phrasing.format(**slots),
                         "schema": "; ".join(TABLES[t] for t in names)},
               "answer": query.format(**slots)}


NAMES = ["Anna", "Ben", "Chloe", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kemal",
         "Lena", "Marco", "Nadia", "Omar", "Priya", "Rosa", "Sven", "Tara", "Yuki"]
ITEMS = ["blue jacket", "laptop bag", "coffee machine", "pair of boots", "desk lamp", "phone case",
         "winter coat", "set of headphones", "kitchen scale", "backpack"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]


def _stories(rng: random.Random) -> list[tuple[str, str]]:
    """(text, one-sentence summary) for one draw of the slots, one per kind of story."""
    name, item, month = rng.choice(NAMES), rng.choice(ITEMS), rng.choice(MONTHS)
    other = rng.choice([i for i in ITEMS if i != item])
    days, n = rng.randint(3, 20), rng.randint(2, 9)
    team = rng.choice(["mobile", "billing", "search", "payments", "data"])
    city = rng.choice(CITIES)
    return [
        (f"{name} ordered a {item} in {month}. The parcel arrived {days} days late and the box was "
         f"damaged. {name} contacted support twice and was offered a discount on the next order.",
         f"{name}'s {item} arrived {days} days late and damaged, and support offered a discount."),
        (f"{name} bought a {item} but received a {other} instead. {name} asked for an exchange, "
         f"sent the {other} back and is still waiting for the refund.",
         f"{name} received a {other} instead of a {item} and is still waiting for the refund."),
        (f"I have used this {item} for {n} months now. It is well made and looks great, but it is "
         f"heavier than I expected. Overall I would buy it again.",
         f"The reviewer likes the well-made {item} after {n} months despite its weight."),
        (f"The {team} team met on Monday. They agreed to ship the new release in {month}, "
         f"{name} will write the test plan, and the budget stays the same.",
         f"The {team} team plans to ship in {month}, with {name} writing the test plan."),
        (f"At 3 a.m. the {team} service in {city} stopped answering for {n * 5} minutes. "
         f"The on-call engineer {name} restarted it, and a fix for the memory leak is planned.",
         f"The {team} service in {city} was down for {n * 5} minutes until {name} restarted it."),
        (f"The {item} stopped working after {n} weeks. {name} followed the manual, but nothing "
         f"helped, so {name} asked for a repair under warranty.",
         f"{name}'s {item} broke after {n} weeks and {name} asked for a warranty repair."),
        (f"Our shop in {city} had its best month in {month}. Sales grew by {n * 3} percent, mostly "
         f"thanks to the new {item}, and two new staff members were hired.",
         f"The {city} shop had its best month in {month}, with sales up {n * 3} percent."),
        (f"{name} wants to move the delivery of a {item} from {month} to the following month "
         f"because {name} will be travelling. {name} also asked whether the address can change.",
         f"{name} wants to postpone the {item} delivery and maybe change the address."),
    ]


def summarize_examples(rng: random.Random, heldout: bool) -> Iterator[dict[str, Any]]:
    while True:
        stories = _stories(rng)
        # The last two kinds of story are never trained on.
        text, summary = rng.choice(stories[-2:] if heldout else stories[:-2])
        yield {"event": {"text": text}, "answer": summary}


_OPENERS = ["Hi! Thanks for reaching out.", "Hello, and thank you for contacting ACME.",
            "Thank you for your message.", "Hi there, thanks for getting in touch."]
_CLOSERS = ["Is there anything else I can help you with?", "Let me know if you have any other questions.",
            "Have a great day!", "Happy to help with anything else."]
_QUESTIONS = {
    "refund": ["When will I get my refund?", "I returned my {item} last week, where is my money back?",
               "How long does a refund take?", "Can you tell me the status of my refund for order #{n}?",
               "I sent the {item} back {d} days ago. When is the refund coming?"],
    "password": ["I forgot my password.", "I can't log in to my account anymore.",
                 "How do I change my password? I have tried {d} times.",
                 "My login does not work since I ordered the {item}, can you help?",
                 "Help, I cannot sign in from {city}."],
    "shipping": ["My order #{n} has not arrived yet.", "How long does shipping take to {city}?",
                 "Where is my order? I ordered it {d} days ago.",
                 "When will my parcel with the {item} be delivered?",
                 "The {item} I ordered still did not arrive."],
    "cancel": ["I want to cancel my order #{n}.", "Can I still cancel the {item} I ordered yesterday?",
               "Please cancel my last order.", "How do I cancel order #{n}?",
               "I changed my mind about the {item}, please cancel it."],
    "return": ["Can I return a {item} that does not fit?", "I'd like to send back my {item}.",
               "How do I exchange a product?", "What is your return policy for a {item}?",
               "Is it too late to return something I bought {d} days ago?"],
    "invoice": ["I need an invoice for order #{n}.", "Where can I find my receipt?",
                "Can you send me the bill for my last purchase?", "I lost my invoice for the {item}.",
                "My accountant needs a receipt for order #{n}."],
    "warranty": ["My {item} stopped working after {d} weeks.", "The {item} I bought is broken.",
                 "Is there a warranty on your products?", "My {item} has a defect.",
                 "After {d} days the {item} is already broken."],
    "payment": ["Which payment methods do you accept?", "Can I pay for the {item} in two parts?",
                "My credit card was declined, how else can I pay?", "Do you take bank transfers?",
                "Is it possible to pay from {city} with a foreign card?"],
    None: ["Do you have a store in {city}?", "Can I speak to a manager?", "Do you sell gift cards?",
           "Are you hiring in {city}?", "Do you offer student discounts on the {item}?",
           "Will the {item} be on sale next month?"],
}
_HANDOFF = "I have passed your question to a colleague, who will get back to you within one business day."


def support_examples(rng: random.Random, heldout: bool) -> Iterator[dict[str, Any]]:
    from training.functions import load

    support = load("support")
    topics = list(_QUESTIONS)
    for i in itertools.count():
        # Held out: the last two phrasings of each topic, never trained on, topics in turn.
        topic = topics[i % len(topics)] if heldout else rng.choice(topics)
        questions = _QUESTIONS[topic]
        template = rng.choice(questions[-2:] if heldout else questions[:-2])
        message = template.format(n=rng.randint(1000, 9999), d=rng.randint(3, 30),
                                  city=rng.choice(CITIES), item=rng.choice(ITEMS))
        facts = support.facts_for(message, support.FAQ)
        body = " ".join(facts) if facts else _HANDOFF
        apology = "I'm sorry for the trouble. " if topic in ("shipping", "warranty", "password") else ""
        yield {"event": {"message": message},
               "answer": f"{rng.choice(_OPENERS)} {apology}{body} {rng.choice(_CLOSERS)}"}


TASKS: dict[str, Callable[[random.Random, bool], Iterator[dict[str, Any]]]] = {
    "sql": sql_examples, "summarize": summarize_examples, "support": support_examples}


def _take(examples: Iterator[dict[str, Any]], n: int, exclude: set[str]) -> list[dict[str, Any]]:
    """n distinct examples (by event) not in `exclude`."""
    out: list[dict[str, Any]] = []
    seen = set(exclude)
    for example in examples:
        key = json.dumps(example["event"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(example)
            if len(out) == n:
                return out
    return out


def build(n_train: int = N_TRAIN, n_heldout: int = N_HELDOUT) -> None:
    DATA.mkdir(exist_ok=True)
    (DATA / "schema.sql").write_text(SCHEMA_SQL)
    for i, (task, examples) in enumerate(TASKS.items()):
        train = _take(examples(random.Random(SEED + i), False), n_train, set())
        heldout = _take(examples(random.Random(SEED + 100 + i), True), n_heldout,
                        {json.dumps(e["event"], sort_keys=True) for e in train})
        for split, rows in (("train", train), ("heldout", heldout)):
            with open(DATA / f"{task}.{split}.jsonl", "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)


def read(task: str, split: str) -> list[dict[str, Any]]:
    with open(DATA / f"{task}.{split}.jsonl") as f:
        return [json.loads(line) for line in f]


if __name__ == "__main__":
    build()
