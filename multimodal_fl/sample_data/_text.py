"""Clinical-note wording driven by a patient's text latent.

A note is a shuffled mix of neutral sentences, "concerning" findings and
"reassuring" findings. The expected number of concerning findings rises with the text
latent and the number of reassuring findings falls; both are random, and some
concerning findings are written negated, so the wording is a noisy view of the latent.
"""

from __future__ import annotations

import numpy as np

__all__ = ["alzheimers_note", "covid_discharge_note", "covid_note"]

COVID_CONCERNING = (
    "short of breath at rest",
    "increased work of breathing",
    "dyspnoea on minimal exertion",
    "speaking in short sentences",
    "using accessory muscles",
    "appears tired and breathless",
    "chest tightness on breathing",
    "tachypnoeic on arrival",
    "bilateral crackles at the bases",
    "looks unwell and clammy",
)
COVID_REASSURING = (
    "mild dry cough",
    "comfortable at rest",
    "no respiratory distress",
    "speaking in full sentences",
    "mild sore throat",
    "chest clear on auscultation",
    "mobilising independently",
    "well-appearing",
    "eating and drinking normally",
)
COVID_NEUTRAL = (
    "Presented with fever and cough for {d} days.",
    "SARS-CoV-2 PCR positive.",
    "Lives with family.",
    "Vaccination history discussed.",
    "Regular medications reviewed.",
    "Plan: repeat observations and review bloods.",
    "Denies chest pain.",
    "No haemoptysis.",
    "Loss of taste and smell reported.",
    "Household contact tested positive last week.",
    "Paracetamol taken at home.",
)
COVID_NEGATED = (
    "no increased work of breathing",
    "not short of breath at rest",
    "no accessory muscle use",
)

AD_CONCERNING = (
    "reports increasing forgetfulness",
    "family concerned about memory",
    "repeats the same questions",
    "misplaces belongings often",
    "difficulty managing finances",
    "got lost driving to a familiar place",
    "word-finding difficulty noted",
    "needs reminders to take medications",
    "struggles to follow conversations",
    "missed several appointments",
)
AD_REASSURING = (
    "no memory concerns",
    "independent in all daily activities",
    "manages own finances",
    "cognitively sharp in conversation",
    "active and socially engaged",
    "drives without difficulty",
    "recalls recent events in detail",
    "volunteers twice a week",
)
AD_NEUTRAL = (
    "Annual review.",
    "Blood pressure reviewed.",
    "Medication reconciliation done.",
    "Discussed diet and exercise.",
    "Flu vaccine offered.",
    "Mild knee pain, uses paracetamol.",
    "Sleeps about {d} hours a night.",
    "Lives with spouse.",
    "Hearing adequate.",
    "Follow-up in twelve months.",
)
AD_NEGATED = (
    "no word-finding difficulty",
    "family not concerned about memory",
    "does not get lost",
)


def _sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-x)))


def _compose(latent: float, rng: np.random.Generator, concerning: tuple[str, ...],
             reassuring: tuple[str, ...], neutral: tuple[str, ...],
             negated: tuple[str, ...], header: str) -> str:
    seen = latent + 0.3 * rng.standard_normal()
    n_conc = int(rng.binomial(5, _sigmoid(1.4 * seen - 1.3)))
    n_reas = int(rng.binomial(5, _sigmoid(-1.4 * seen - 0.7)))
    n_neut = int(rng.integers(2, 5))
    n_neg = int(rng.binomial(1, 0.3))
    phrases: list[str] = []
    phrases += [str(p).capitalize() + "." for p in rng.choice(concerning, n_conc, replace=False)]
    phrases += [str(p).capitalize() + "." for p in rng.choice(reassuring, n_reas, replace=False)]
    phrases += [str(p).capitalize() + "." for p in rng.choice(negated, n_neg, replace=False)]
    days = int(rng.integers(2, 10))
    phrases += [str(p).format(d=days) for p in rng.choice(neutral, n_neut, replace=False)]
    order = rng.permutation(len(phrases))
    return header + " " + " ".join(phrases[i] for i in order)


def covid_note(latent: float, rng: np.random.Generator) -> str:
    """An emergency-department presentation note for a COVID-19 patient.

    Parameters
    ----------
    latent
        The patient's text latent (standard-normal scale).
    rng
        Random source.

    Returns
    -------
    str
        Plain-text note; never mentions oxygen or the outcome.
    """
    return _compose(latent, rng, COVID_CONCERNING, COVID_REASSURING, COVID_NEUTRAL,
                    COVID_NEGATED, "ED assessment:")


def covid_discharge_note(positive: bool, rng: np.random.Generator) -> str:
    """A discharge summary written after the outcome (a leakage trap: dated after the index)."""
    if positive:
        body = "Required supplemental oxygen during admission; weaned before discharge."
    else:
        body = "Managed without supplemental oxygen; discharged home."
    weeks = int(rng.integers(2, 6))
    return f"Discharge summary: COVID-19 pneumonitis. {body} Follow-up in {weeks} weeks."


def alzheimers_note(latent: float, rng: np.random.Generator) -> str:
    """A primary-care review note for an older adult; memory wording follows ``latent``.

    Parameters
    ----------
    latent
        The patient's text latent (standard-normal scale).
    rng
        Random source.

    Returns
    -------
    str
        Plain-text note; never names a dementia diagnosis.
    """
    return _compose(latent, rng, AD_CONCERNING, AD_REASSURING, AD_NEUTRAL, AD_NEGATED,
                    "Primary care review:")
