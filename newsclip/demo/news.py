"""Templated news prose in English and German: headlines and filler sentences around a scene sentence."""

from __future__ import annotations

import numpy as np

from newsclip.demo.scenes import Scene

# Slot values as (english, german) pairs.
CITIES = [("Berlin", "Berlin"), ("Hamburg", "Hamburg"), ("Munich", "München"), ("Vienna", "Wien"),
          ("Zurich", "Zürich"), ("London", "London"), ("Paris", "Paris"), ("Madrid", "Madrid")]
DAYS = [("Monday", "Montag"), ("Tuesday", "Dienstag"), ("Wednesday", "Mittwoch"), ("Thursday", "Donnerstag"),
        ("Friday", "Freitag"), ("Saturday", "Samstag"), ("Sunday", "Sonntag")]
GROUPS = [("The council", "Der Rat"), ("The government", "Die Regierung"), ("The police", "Die Polizei"),
          ("The museum", "Das Museum"), ("The club", "Der Verein"), ("The company", "Das Unternehmen")]
TOPICS = [("the budget", "den Haushalt"), ("the new plan", "den neuen Plan"), ("the festival", "das Fest"),
          ("the election", "die Wahl"), ("the report", "den Bericht"), ("the project", "das Projekt")]
NUMBERS = [(str(n), str(n)) for n in (3, 5, 7, 12, 20, 40, 100, 250)]

HEADLINES = [
    ("News from {city}", "Nachrichten aus {city}"),
    ("{group} discusses {topic}", "{group} diskutiert {topic}"),
    ("What happened on {day}", "Was am {day} geschah"),
    ("A picture from {city}", "Ein Bild aus {city}"),
    ("{number} people came on {day}", "{number} Menschen kamen am {day}"),
]
FILLERS = [
    ("{group} met in {city} on {day}.", "{group} traf sich am {day} in {city}."),
    ("{group} will present {topic} next week.", "{group} wird nächste Woche {topic} vorstellen."),
    ("About {number} people watched the event.", "Etwa {number} Menschen sahen die Veranstaltung."),
    ("The weather in {city} was calm on {day}.", "Das Wetter in {city} war am {day} ruhig."),
    ("Many readers criticised {topic}.", "Viele Leser kritisierten {topic}."),
    ("The photo was taken in {city}.", "Das Foto wurde in {city} aufgenommen."),
    ("More details will follow on {day}.", "Weitere Details folgen am {day}."),
    ("{group} did not comment on {topic}.", "{group} kommentierte {topic} nicht."),
]


def _fill(template: tuple[str, str], rng: np.random.Generator) -> tuple[str, str]:
    slots = {name: values[int(rng.integers(len(values)))]
             for name, values in (("city", CITIES), ("day", DAYS), ("group", GROUPS), ("topic", TOPICS),
                                  ("number", NUMBERS))}
    en, de = template
    en = en.format(**{k: v[0] for k, v in slots.items()})
    de = de.format(**{k: v[1] for k, v in slots.items()})
    return en, de


def headline(rng: np.random.Generator) -> tuple[str, str]:
    """A short headline, as (english, german)."""
    return _fill(HEADLINES[int(rng.integers(len(HEADLINES)))], rng)


def filler_sentence(rng: np.random.Generator) -> tuple[str, str]:
    """One sentence of news prose that says nothing about the picture, as (english, german)."""
    return _fill(FILLERS[int(rng.integers(len(FILLERS)))], rng)


def article(scene: Scene, rng: np.random.Generator, fillers: int = 3) -> dict[str, tuple[str, str]]:
    """Title and body for a scene: the scene sentence first, so it survives CLIP's 77-token cut."""
    title = headline(rng)
    sentences = [(scene.caption("en"), scene.caption("de"))] + [filler_sentence(rng) for _ in range(fillers)]
    body = (" ".join(s[0] for s in sentences), " ".join(s[1] for s in sentences))
    return {"title": title, "text": body}
