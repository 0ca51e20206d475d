"""Writes embedserve/data/calibration.txt: the built-in texts the int8 / uint8 output types calibrate their
per-dimension ranges on (one text per line).

The texts are composed from the hand-written pieces below, deterministically (a fixed seed), so that the file
is reproducible and reviewable: queries and passages in a dozen domains, instructions with the usual retrieval
prefixes, code, numbers, tables and logs, chat and reviews, and sentences in a dozen languages and scripts,
from one word to a few hundred characters. What matters for ranges is breadth, not the exact words.

    python scripts/make_calibration_texts.py            # rewrite the file
    python scripts/make_calibration_texts.py --check    # exit 1 if the file differs from what this writes
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "embedserve" / "data" / "calibration.txt"
SEED = 2026
COUNT = 1200

TOPICS = [
    "password reset", "solar panels", "sourdough bread", "tax returns", "knee pain", "electric cars", "python lists",
    "kubernetes pods", "mortgage rates", "the french revolution", "black holes", "coral reefs", "job interviews",
    "vegetable gardens", "marathon training", "jazz history", "wifi routers", "vaccines", "climate change",
    "machine learning", "cat allergies", "wedding speeches", "copyright law", "coffee brewing", "sleep apnea",
    "renaissance painting", "stock options", "bicycle repair", "volcanoes", "remote work", "baby teeth",
    "chess openings", "noise cancelling headphones", "indoor plants", "credit scores", "the roman empire",
    "quantum computing", "food poisoning", "dog training", "home insurance", "photosynthesis", "guitar chords",
]
CONCEPTS = [
    "inflation", "a neural network", "compound interest", "an API gateway", "entropy", "a hash table", "a sonnet",
    "the placebo effect", "plate tectonics", "a mutual fund", "gene expression", "a load balancer", "irony",
    "supply and demand", "a vector database", "the immune system", "a lease agreement", "dark matter",
    "an index fund", "a transformer model", "osmosis", "a container image", "the electoral college", "a haiku",
]
QUERY_TEMPLATES = [
    "how do I {verb} {topic}", "what is {concept}", "best {topic} tips for beginners", "{topic} near me",
    "why is {topic} so expensive", "{concept} explained simply", "difference between {concept} and {concept2}",
    "is {topic} worth it in {year}", "{topic} step by step guide", "can you explain {concept} to a child",
    "common mistakes with {topic}", "{topic}?", "history of {topic}", "cheapest way to learn {topic}",
    "{topic} symptoms and causes", "does {concept} really matter", "{topic} checklist", "who invented {concept}",
]
VERBS = ["fix", "start with", "understand", "choose", "compare", "clean up", "set up", "get better at", "avoid"]
PREFIXES = [
    "", "", "", "query: ", "passage: ", "search_query: ", "search_document: ",
    "Represent this sentence for searching relevant passages: ",
    "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery: ",
    "Instruct: Retrieve semantically similar text.\nQuery: ", "classification: ", "clustering: ",
]
DOMAINS = {
    "science": [
        "Light takes a little over eight minutes to travel from the Sun to the Earth.",
        "Enzymes lower the activation energy of the reactions they catalyse without being consumed.",
        "A protein's function follows from the shape its chain of amino acids folds into.",
        "Water expands as it freezes, which is why ice floats and pipes burst in winter.",
        "The half-life of carbon-14 is about 5,730 years, which makes it useful for dating organic remains.",
        "Neurons signal one another across synapses by releasing neurotransmitters.",
        "Sound travels faster in water than in air and faster still in steel.",
        "Tectonic plates move a few centimetres a year, about as fast as fingernails grow.",
    ],
    "history": [
        "The printing press spread across Europe within a few decades of its invention in Mainz.",
        "The Silk Road carried paper, spices and ideas between China and the Mediterranean for centuries.",
        "The treaty ended the war but left the border question open for another generation.",
        "Many medieval cities were walled, and their gates were closed at sunset.",
        "The railway cut the journey between the two cities from three days to six hours.",
        "Archaeologists found the ship's cargo almost intact under two metres of silt.",
        "The empire's roads were built for its armies but carried merchants and pilgrims too.",
    ],
    "medicine": [
        "The patient reported a dry cough and mild fever lasting five days.",
        "Blood pressure above 140/90 mmHg on repeated readings is usually treated as hypertension.",
        "Antibiotics have no effect on viral infections such as the common cold.",
        "Take the tablets with food, twice daily, and finish the full course.",
        "An MRI scan showed a small tear in the anterior cruciate ligament.",
        "Regular physical activity lowers the risk of type 2 diabetes and heart disease.",
        "Symptoms usually improve within a week; seek care if breathing becomes difficult.",
    ],
    "law": [
        "The tenant must give at least thirty days' written notice before ending the lease.",
        "The court held that the clause was unenforceable because it was never clearly disclosed.",
        "Either party may terminate this agreement for material breach not cured within 15 days.",
        "Personal data may be processed only for the purposes stated at the time of collection.",
        "The appeal was dismissed, and costs were awarded to the respondent.",
        "A will must be signed in the presence of two witnesses to be valid in this jurisdiction.",
    ],
    "finance": [
        "The central bank raised its policy rate by a quarter of a percentage point.",
        "Net income for the quarter was $412 million, or $1.87 per diluted share.",
        "Diversifying across asset classes reduces risk without necessarily reducing returns.",
        "The bond's yield rose as its price fell after the inflation figures were published.",
        "Operating expenses grew 6% year over year, mainly from higher cloud costs.",
        "An emergency fund should usually cover three to six months of expenses.",
    ],
    "technology": [
        "The service returns 429 when a client exceeds its rate limit; retry after the given delay.",
        "Containers share the host kernel, which makes them lighter than virtual machines.",
        "The database replicates each write to two other nodes before acknowledging it.",
        "Restart the router, wait two minutes, then check whether the status light turns green.",
        "The new release drops support for Python 3.8 and adds type hints throughout.",
        "Caching the tokenizer output cut the median latency from 41 ms to 12 ms.",
        "Two-factor authentication protects an account even when its password leaks.",
    ],
    "cooking": [
        "Knead the dough for ten minutes, until it is smooth and springs back when pressed.",
        "Brown the onions slowly over low heat; it takes longer than most recipes admit.",
        "Add the pasta to salted boiling water and cook it for a minute less than the packet says.",
        "Rest the meat for five minutes before slicing so the juices stay inside.",
        "Toast the spices in a dry pan until fragrant, then grind them.",
        "The cake is done when a skewer pushed into its centre comes out clean.",
    ],
    "travel": [
        "The old town is best explored on foot; most streets are closed to cars.",
        "Trains to the airport leave every fifteen minutes from platform four.",
        "The museum is free on the first Sunday of every month.",
        "Book the ferry in advance in August, when the island is at its busiest.",
        "The hike to the summit takes about four hours, and the last stretch is steep.",
        "Carry cash: many small shops in the villages do not take cards.",
    ],
    "sports": [
        "The home side scored twice in the last ten minutes to win 3-2.",
        "She finished the marathon in 2 hours 58 minutes, a personal best.",
        "The coach rotated the squad after three games in six days.",
        "Stretching after a run helps, but sleep does more for recovery.",
        "The final set went to a tie-break after almost three hours of play.",
    ],
    "nature": [
        "Migrating birds use the Earth's magnetic field and the stars to find their way.",
        "Oak trees can support hundreds of species of insects.",
        "The river floods every spring, leaving rich silt across the plain.",
        "Bees communicate the direction of flowers through a waggle dance.",
        "Mangroves protect coastlines from storms and shelter young fish.",
        "Lichens are a partnership between a fungus and an alga or cyanobacterium.",
    ],
    "business": [
        "The meeting has been moved to Thursday at 10:30; the agenda is attached.",
        "Customer churn fell after the onboarding emails were rewritten.",
        "Please review the attached invoice and confirm the delivery address.",
        "We are hiring a senior data engineer to join the platform team.",
        "The supplier has agreed to extend payment terms to sixty days.",
        "Our support team answers within one business day.",
    ],
}
CODE = [
    "def {name}(items):\\n    return [x for x in items if x is not None]",
    "for (let i = 0; i < {n}; i++) {{ total += values[i]; }}",
    "SELECT {name}, COUNT(*) FROM events WHERE day >= '2024-0{d}-01' GROUP BY {name} ORDER BY 2 DESC;",
    "git commit -m \"fix {name} when the list is empty\" && git push origin main",
    "docker run --rm -p {port}:80 -e LOG_LEVEL=debug ghcr.io/example/{name}:latest",
    "kubectl get pods -n {name} -o wide | grep -v Running",
    "public static int {name}(int[] a) {{ int s = 0; for (int x : a) s += x; return s; }}",
    "fn {name}(v: &[f32]) -> f32 {{ v.iter().map(|x| x * x).sum::<f32>().sqrt() }}",
    "import numpy as np; x = np.linspace(0, 1, {n}); print(x.mean(), x.std())",
    "curl -s -H 'Authorization: Bearer $TOKEN' https://api.example.com/v1/{name}?limit={n}",
    "const {name} = async (id) => (await fetch(`/api/items/${{id}}`)).json();",
    "ERROR {name}.py:{n} KeyError: 'user_id' while handling request /api/v2/orders",
    "<div class=\"{name}\"><a href=\"/docs\">Read the docs</a></div>",
    "#include <stdio.h>\\nint main(void) {{ printf(\"%d\\n\", {n}); return 0; }}",
]
CODE_NAMES = ["parse_rows", "user_stats", "billing", "normalize", "checkout", "ingest", "search", "metrics", "auth"]
LANGUAGES = [
    "Der Bericht wurde gestern veröffentlicht und sorgt bereits für Diskussionen.",
    "Können Sie mir sagen, wie ich zum Bahnhof komme?",
    "La réunion commencera à neuf heures précises dans la grande salle.",
    "Je cherche un appartement lumineux près du centre-ville.",
    "El gobierno anunció nuevas medidas para reducir el consumo de energía.",
    "¿Dónde puedo comprar billetes para el concierto de mañana?",
    "Il ristorante è chiuso il lunedì, ma apre presto la domenica.",
    "O relatório mostra um aumento das exportações no último trimestre.",
    "De trein naar Amsterdam vertrekt over tien minuten van spoor drie.",
    "Spotkanie zostało przełożone na przyszły tydzień.",
    "Toplantı yarın sabah saat onda başlayacak.",
    "Книга вышла в прошлом месяце и уже стала бестселлером.",
    "Как правильно настроить резервное копирование данных?",
    "Η συνάντηση θα γίνει την Τρίτη στο δημαρχείο.",
    "המשלוח יגיע בתוך שלושה ימי עסקים.",
    "تم تأجيل الرحلة بسبب سوء الأحوال الجوية",
    "कृपया अपना पासवर्ड किसी के साथ साझा न करें।",
    "আগামীকাল সকালে বৃষ্টি হতে পারে।",
    "明日の会議は十時からに変更になりました。",
    "この本はとても面白くて、一晩で読み終えました。",
    "我想预订两个人今晚七点的座位。",
    "这个软件的新版本修复了很多问题。",
    "서울의 지하철은 깨끗하고 빠릅니다.",
    "ราคาสินค้ารวมภาษีมูลค่าเพิ่มแล้ว",
    "Hội nghị sẽ được tổ chức tại Hà Nội vào tháng tới.",
    "Mkutano utafanyika kesho asubuhi katika ukumbi mkuu.",
    "Kokous alkaa huomenna kello yhdeksän.",
    "Mötet är flyttat till nästa vecka på grund av sjukdom.",
    "Prodavnica radi svakog dana od osam do osam.",
    "Ang pulong ay gaganapin bukas ng umaga.",
]
CHAT = [
    "thx!! that fixed it 🙌", "lol no way", "can u send me the link again?", "brb 5 min", "ok sounds good 👍",
    "anyone else seeing the app crash on startup??", "this is the worst update ever 😤", "love it ❤️ 10/10",
    "Delivery was two days late and the box was damaged.", "Works exactly as described, would buy again.",
    "Battery life is great but the screen scratches easily.", "Customer service never replied to my email.",
    "Great value for the price. Five stars.", "Meh. It's fine, nothing special.",
    "The hotel staff were friendly but the room was noisy.", "Returned it: the size runs small.",
]
WORDS = ["a", "Yes.", "no", "OK", "?", "hello", "Thanks!", "N/A", "42", "TBD", "urgent", "2024-03-17", "v2.1.0",
         "™", "…", "#hashtag", "@someone", "e-mail", "café", "naïve", "über", "Ω", "π ≈ 3.14159"]


def _query(rng: random.Random) -> str:
    concept, concept2 = rng.sample(CONCEPTS, 2)
    q = rng.choice(QUERY_TEMPLATES).format(verb=rng.choice(VERBS), topic=rng.choice(TOPICS), concept=concept,
                                           concept2=concept2, year=rng.randint(2015, 2027))
    if rng.random() < 0.3:
        q = q.capitalize()
    return rng.choice(PREFIXES) + q


def _passage(rng: random.Random) -> str:
    domain = rng.choice(list(DOMAINS))
    sentences = rng.sample(DOMAINS[domain], rng.randint(1, min(5, len(DOMAINS[domain]))))
    if rng.random() < 0.2:  # a stray sentence from elsewhere, as real documents have
        sentences.insert(rng.randrange(len(sentences) + 1), rng.choice(DOMAINS[rng.choice(list(DOMAINS))]))
    return rng.choice(PREFIXES[:5]) + " ".join(sentences)


def _code(rng: random.Random) -> str:
    return rng.choice(CODE).format(name=rng.choice(CODE_NAMES), n=rng.randint(2, 5000), d=rng.randint(1, 9),
                                   port=rng.choice([8080, 3000, 5432, 9000]))


def _numbers(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        rows = " ".join(f"| {rng.randint(1990, 2025)} | {rng.randint(1000, 9_999_999):,} | {rng.uniform(-3, 9):.1f}% |"
                        for _ in range(rng.randint(2, 5)))
        return "| year | value | change |" + " " + rows
    if kind == 1:
        return (f'{{"id": {rng.randint(1, 99999)}, "status": "{rng.choice(["ok", "failed", "pending"])}", '
                f'"amount": {rng.uniform(0, 5000):.2f}, "tags": ["{rng.choice(CODE_NAMES)}"]}}')
    if kind == 2:
        return (f"{rng.randint(2019, 2026)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:"
                f"{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}Z {rng.choice(['INFO', 'WARN', 'ERROR'])} "
                f"{rng.choice(CODE_NAMES)} latency_ms={rng.randint(1, 900)} status={rng.choice([200, 404, 500, 503])}")
    if kind == 3:
        return (f"Revenue {rng.choice(['rose', 'fell'])} {rng.uniform(0.1, 30):.1f}% to "
                f"${rng.uniform(0.1, 90):.2f} billion in Q{rng.randint(1, 4)} {rng.randint(2010, 2026)}.")
    return (f"Order #{rng.randint(10000, 99999)}: {rng.randint(1, 9)} x item {rng.randint(100, 999)} at "
            f"€{rng.uniform(1, 300):.2f}")


def _multilingual(rng: random.Random) -> str:
    return " ".join(rng.sample(LANGUAGES, rng.choice([1, 1, 1, 2])))


def _short(rng: random.Random) -> str:
    return rng.choice(WORDS + CHAT + TOPICS)


def _long(rng: random.Random) -> str:
    parts = [_passage(rng) for _ in range(rng.randint(2, 3))]
    return " ".join(p.split(": ", 1)[-1] for p in parts)


MAKERS = [(_query, 25), (_passage, 25), (_code, 10), (_numbers, 10), (_multilingual, 12), (_short, 8), (_long, 10)]


def texts() -> list[str]:
    rng = random.Random(SEED)
    makers = [m for m, weight in MAKERS for _ in range(weight)]
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < COUNT:
        text = rng.choice(makers)(rng).replace("\n", " ").strip()
        if text and text not in seen:
            seen.add(text)
            out.append(text)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    body = "\n".join(texts()) + "\n"
    if args.check:
        same = OUT.read_text(encoding="utf-8") == body
        print("up to date" if same else f"{OUT} differs from what this script writes", file=sys.stderr)
        return 0 if same else 1
    OUT.write_text(body, encoding="utf-8")
    print(f"wrote {COUNT} texts to {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
