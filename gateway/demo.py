"""The demo "production" dataset: hospital visits, generated with a fixed seed, and its public lookup table
`diagnosis_chapters` (each diagnosis code of the demo with its ICD-10 chapter), which queries may join.

Patients have several visits each; age, sex, region and income belong to the patient, the rest to the visit.
Planted structure (so that DP answers and synthetic proxies have something to find): income rises with age
(Pearson ρ ≈ 0.8), length of stay rises with age, and urgent triage labels go with certain diagnoses and with
words in the triage note.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

REGIONS = ["north", "south", "east", "west", "central"]
SEXES = ["F", "M", "X"]
URGENT_DX = ["I21", "I63", "J96", "R07", "S72", "A41", "K35", "N17"]
ROUTINE_DX = [
    "Z00",
    "Z01",
    "Z09",
    "J06",
    "M54",
    "E11",
    "I10",
    "K21",
    "L20",
    "H10",
    "R51",
    "J45",
    "F41",
    "N39",
    "M25",
    "B34",
    "R10",
    "E78",
    "K59",
    "T14",
]
URGENT_NOTES = [
    "chest pain radiating to left arm",
    "shortness of breath at rest",
    "suspected stroke, facial droop",
    "high fever and confusion",
    "severe abdominal pain",
    "fall with suspected hip fracture",
    "bleeding that will not stop",
    "unresponsive on arrival",
]
ROUTINE_NOTES = [
    "routine check-up",
    "follow-up after treatment",
    "prescription refill",
    "mild cough for a week",
    "back pain after gardening",
    "rash on forearm",
    "vaccination visit",
    "blood pressure review",
    "sore throat",
    "annual physical",
]
START = dt.date(2015, 1, 1)
END = dt.date(2026, 12, 31)

POLICY_YAML = """\
dataset: visits
privacy_unit: patient_id
max_rows_per_unit: 10
budget:
  per_principal: {epsilon: 10.0, delta: 1.0e-6}
  total: {epsilon: 100.0, delta: 1.0e-5}
columns:
  patient_id:     {type: int, usage: hidden}
  age:            {type: int, bounds: [0, 110]}
  sex:            {type: category, domain: [F, M, X]}
  region:         {type: category, domain: [north, south, east, west, central]}
  diagnosis:      {type: category}            # no public domain: DP key selection
  income:         {type: decimal, bounds: [0, 500000], precision: 0.01}
  length_of_stay: {type: int, bounds: [0, 60]}
  visit_day:      {type: date, bounds: [2015-01-01, 2026-12-31]}
  triage_note:    {type: text, usage: labeling}
  triage_label:   {type: category, domain: [urgent, routine], usage: labeling}
  ssn:            {type: text, usage: hidden}
roles:
  analyst: [query, synth]
  lf_author: [labeling]
synthesis: {mode: dp}
labels: {gold_column: triage_label, classes: [urgent, routine]}
"""

# The public table of the demo: every diagnosis code the visits use, with its ICD-10 chapter (public knowledge).
CHAPTERS = {
    "A": "Infectious and parasitic diseases",
    "B": "Infectious and parasitic diseases",
    "E": "Endocrine, nutritional and metabolic diseases",
    "F": "Mental and behavioural disorders",
    "H": "Diseases of the eye and adnexa",
    "I": "Diseases of the circulatory system",
    "J": "Diseases of the respiratory system",
    "K": "Diseases of the digestive system",
    "L": "Diseases of the skin and subcutaneous tissue",
    "M": "Diseases of the musculoskeletal system",
    "N": "Diseases of the genitourinary system",
    "R": "Symptoms, signs and abnormal findings",
    "S": "Injury and poisoning",
    "T": "Injury and poisoning",
    "Z": "Factors influencing health status",
}
PUBLIC_TABLES_YAML = """\
public_tables:
  diagnosis_chapters:             # public lookup table: GET /v1/datasets/visits/public/diagnosis_chapters
    source: diagnosis_chapters.csv
    unique_key: code
    columns:
      code:    {type: category}
      chapter: {type: category}   # its values are public group keys (from the table itself)
"""
# The demo's policy as `bastion demo` registers it on DuckDB: the visits and their public table.
DEMO_POLICY_YAML = POLICY_YAML + PUBLIC_TABLES_YAML


def diagnosis_chapters() -> pa.Table:
    """The demo's public table: each diagnosis code of the demo and its chapter, sorted by code."""
    codes = sorted({*URGENT_DX, *ROUTINE_DX})
    return pa.table({"code": codes, "chapter": [CHAPTERS[c[0]] for c in codes]})


EXAMPLE_LFS_YAML = """\
# Labeling functions for the demo visits table: `bastion lf stats lfs.yaml --dataset visits --epsilon 1`
lfs:
  - name: urgent_words
    label: urgent
    keywords: {column: triage_note, any: [chest pain, shortness of breath, stroke, unresponsive, bleeding]}
  - name: routine_words
    label: routine
    keywords: {column: triage_note, any: [routine, follow-up, refill, vaccination, annual]}
  - name: cardiac_dx
    label: urgent
    when: "diagnosis IN ('I21', 'I63')"
  - name: long_stay
    label: urgent
    when: "length_of_stay >= 8"
python_lfs: [urgent_diagnosis]
"""


def generate_visits(n_rows: int = 500_000, seed: int = 7) -> pa.Table:
    """At least `n_rows` visits (exactly n_rows), several per patient, deterministic for a seed."""
    rng = np.random.default_rng(seed)
    visits_per_patient = 1 + rng.poisson(4.0, size=n_rows // 3 + 10)
    owner = np.repeat(np.arange(len(visits_per_patient)), visits_per_patient)[:n_rows]
    n_patients = int(owner.max()) + 1

    age_p = np.clip(rng.gamma(4.0, 11.0, n_patients), 0, 105).astype(np.int64)
    sex_p = rng.choice(len(SEXES), n_patients, p=[0.51, 0.47, 0.02])
    region_p = rng.choice(len(REGIONS), n_patients, p=[0.22, 0.25, 0.18, 0.15, 0.20])
    income_p = np.clip(8_000 + 1_100 * age_p + rng.normal(0, 12_000, n_patients), 0, 480_000).round(2)

    age = age_p[owner]
    urgent = rng.random(n_rows) < np.clip(0.08 + age / 300.0, 0, 0.6)
    dx = np.where(
        urgent,
        np.asarray(URGENT_DX, dtype=object)[rng.integers(0, len(URGENT_DX), n_rows)],
        np.asarray(ROUTINE_DX, dtype=object)[rng.integers(0, len(ROUTINE_DX), n_rows)],
    )
    # Labels disagree with the diagnosis family now and then, so labeling functions have something to miss.
    flip = rng.random(n_rows) < 0.05
    label_urgent = np.where(flip, ~urgent, urgent)
    note_urgent = np.where(rng.random(n_rows) < 0.85, label_urgent, ~label_urgent)
    notes = np.where(
        note_urgent,
        np.asarray(URGENT_NOTES, dtype=object)[rng.integers(0, len(URGENT_NOTES), n_rows)],
        np.asarray(ROUTINE_NOTES, dtype=object)[rng.integers(0, len(ROUTINE_NOTES), n_rows)],
    )
    los = np.clip(rng.poisson(0.5 + age / 25.0 + urgent * 4.0), 0, 60).astype(np.int64)
    days = rng.integers(0, (END - START).days + 1, n_rows)
    visit_day = np.datetime64(START.isoformat()) + days.astype("timedelta64[D]")
    ssn = np.char.add("9", rng.integers(10**7, 10**8, n_patients).astype(str))[owner]

    return pa.table(
        {
            "patient_id": pa.array(owner + 100_000, pa.int64()),
            "age": pa.array(age, pa.int64()),
            "sex": pa.array(np.asarray(SEXES, dtype=object)[sex_p[owner]], pa.string()),
            "region": pa.array(np.asarray(REGIONS, dtype=object)[region_p[owner]], pa.string()),
            "diagnosis": pa.array(dx, pa.string()),
            "income": pa.array(income_p[owner], pa.float64()),
            "length_of_stay": pa.array(los, pa.int64()),
            "visit_day": pa.array(visit_day, pa.date32()),
            "triage_note": pa.array(notes, pa.string()),
            "triage_label": pa.array(np.where(label_urgent, "urgent", "routine"), pa.string()),
            "ssn": pa.array(ssn, pa.string()),
        }
    )


def write_demo(
    directory: Path, n_rows: int = 500_000, seed: int = 7, *, public_tables: bool = True
) -> tuple[Path, Path]:
    """Write the demo Parquet file and its policy, with the public table `diagnosis_chapters` beside them unless
    `public_tables` is false (an engine without public tables); return (data path, policy path)."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "visits.parquet"
    pq.write_table(generate_visits(n_rows, seed), data)
    policy = directory / "visits.yaml"
    if public_tables:
        pacsv.write_csv(diagnosis_chapters(), directory / "diagnosis_chapters.csv")
    policy.write_text(DEMO_POLICY_YAML if public_tables else POLICY_YAML)
    return data, policy


def write_examples(directory: Path) -> Path:
    """Public example files for the demo's users (no private data); returns the LF file."""
    directory.mkdir(parents=True, exist_ok=True)
    lfs = directory / "lfs.yaml"
    lfs.write_text(EXAMPLE_LFS_YAML)
    return lfs


# The demo visits with a row identity (visit_id) and the evaluate grant, for evaluating a model's predictions.
EVALUATION_POLICY_YAML = (
    POLICY_YAML.replace(
        "  patient_id:     {type: int, usage: hidden}\n",
        "  patient_id:     {type: int, usage: hidden}\n  visit_id:       {type: int, usage: hidden}\n",
    ).replace("  analyst: [query, synth]\n", "  analyst: [query, synth, evaluate]\n")
    + "row_key: visit_id\n"
)


def example_predictions(visits: pa.Table, seed: int = 3, *, flip: float = 0.1) -> pa.Table:
    """A deliberately imperfect triage model's predictions for `visits` (which has visit_id): urgent for an urgent
    diagnosis family or a stay of 8 days or more, with a fraction `flip` of its labels flipped at random; its
    score is a noisy confidence in urgent."""
    rng = np.random.default_rng(seed)
    dx = visits["diagnosis"].to_numpy(zero_copy_only=False)
    los = visits["length_of_stay"].to_numpy()
    urgent = np.isin(dx, URGENT_DX) | (los >= 8)
    urgent = np.where(rng.random(len(urgent)) < flip, ~urgent, urgent)
    score = np.clip(np.where(urgent, 0.75, 0.25) + rng.normal(0, 0.15, len(urgent)), 0.0, 1.0)
    return pa.table(
        {
            "visit_id": visits["visit_id"],
            "label": pa.array(np.where(urgent, "urgent", "routine"), pa.string()),
            "score": pa.array(score, pa.float64()),
        }
    )


def write_evaluation_demo(directory: Path, n_rows: int = 500_000, seed: int = 7) -> tuple[Path, Path, Path]:
    """The demo visits with a visit_id, their policy (row_key: visit_id) and an example model's predictions;
    returns (data path, policy path, predictions path)."""
    directory.mkdir(parents=True, exist_ok=True)
    visits = generate_visits(n_rows, seed)
    visits = visits.append_column("visit_id", pa.array(np.arange(1, visits.num_rows + 1) * 7 + 1_000_000, pa.int64()))
    data = directory / "visits.parquet"
    pq.write_table(visits, data)
    policy = directory / "visits.yaml"
    policy.write_text(EVALUATION_POLICY_YAML)
    predictions = directory / "triage-v3.parquet"
    pq.write_table(example_predictions(visits), predictions)
    return data, policy, predictions


# The demo reports every version's DP data monitoring (a report per registration and append, see README).
MONITORING_YAML = """\
monitoring: {epsilon: 1.0, cap: {epsilon: 10.0}}   # DP data monitoring: ε per version's report, at most 10 in all
"""
# Where the demo patients' consent to debug access lives (`bastion access request`), and the one scope they consent to.
CONSENT_YAML = """\
consent:                          # patients' consent to debug access (bastion access request --units ...)
  source: consent.csv
  unit: patient_id
  scope: scope
  expires: expires_at
  scopes: [triage_debugging]
"""
# The demo's policy as `bastion demo` registers it on DuckDB: the visits with a row identity (visit_id) for model
# evaluation, their public table, and consent; the analyst may query, synthesise, evaluate and request access.
DEMO_ACCESS_POLICY_YAML = (
    EVALUATION_POLICY_YAML.replace(
        "  analyst: [query, synth, evaluate]\n", "  analyst: [query, synth, evaluate, access]\n"
    )
    + PUBLIC_TABLES_YAML
    + CONSENT_YAML
    + MONITORING_YAML
)
CONSENTING = 5  # patients with a valid consent in the demo
EXPIRED_CONSENTS = 1  # and one whose consent has ended


def example_consent(visits: pa.Table, *, consenting: int = CONSENTING, expired: int = EXPIRED_CONSENTS) -> pa.Table:
    """Consent records for the demo: the first `consenting` patients consent to triage debugging until the end of
    2030; the next `expired` patients' consent ended in 2020 (so it gives no rows)."""
    patients = sorted(set(visits["patient_id"].to_pylist()))[: consenting + expired]
    ends = ["2030-12-31T23:59:59Z"] * consenting + ["2020-01-01T00:00:00Z"] * expired
    return pa.table(
        {
            "patient_id": pa.array(patients[: len(ends)], pa.int64()),
            "scope": pa.array(["triage_debugging"] * len(ends), pa.string()),
            "expires_at": pa.array(ends[: len(patients)], pa.string()),
        }
    )


def write_access_demo(directory: Path, n_rows: int = 500_000, seed: int = 7) -> tuple[Path, Path, Path, list[int]]:
    """The DuckDB demo: the visits with a visit_id, an example model's predictions, the public table and consent
    records beside them, and the policy naming them all; returns (data path, policy path, predictions path, the
    patients with a valid consent)."""
    data, policy, predictions = write_evaluation_demo(directory, n_rows=n_rows, seed=seed)
    policy.write_text(DEMO_ACCESS_POLICY_YAML)
    pacsv.write_csv(diagnosis_chapters(), directory / "diagnosis_chapters.csv")
    consent = example_consent(pq.read_table(data, columns=["patient_id"]))
    pacsv.write_csv(consent, directory / "consent.csv")
    return data, policy, predictions, consent["patient_id"].to_pylist()[:CONSENTING]


# A small hospital: a second demo dataset of several private tables of one unit (the patient), joined on it.
HOSPITAL_POLICY_YAML = """\
dataset: hospital                 # its own table: one row per patient (read as FROM hospital)
source: patients.parquet
privacy_unit: patient_id
max_rows_per_unit: 1
budget:
  per_principal: {epsilon: 10.0, delta: 1.0e-6}
  total: {epsilon: 100.0, delta: 1.0e-5}
columns:
  patient_id: {type: int, usage: hidden}
  age:        {type: int, bounds: [0, 110]}
  sex:        {type: category, domain: [F, M, X]}
  region:     {type: category, domain: [north, south, east, west, central]}
  income:     {type: decimal, bounds: [0, 500000], precision: 0.01}
private_tables:                   # read as FROM hospital.visits, FROM hospital.labs; joined on patient_id
  visits:
    source: hospital_visits.parquet
    unit_column: patient_id
    max_rows_per_unit: 8
    foreign_keys: {patient_id: hospital.patient_id}
    columns:
      patient_id: {type: int, usage: hidden}
      visit_id:   {type: int, bounds: [0, 100000000]}
      diagnosis:  {type: category}
      urgent:     {type: bool}
      length_of_stay: {type: int, bounds: [0, 60]}
  labs:
    source: hospital_labs.parquet
    unit_column: patient_id
    max_rows_per_unit: 12
    foreign_keys: {visit_id: visits.visit_id}
    columns:
      patient_id: {type: int, usage: hidden}
      visit_id:   {type: int, bounds: [0, 100000000]}
      test:       {type: category, domain: [glucose, creatinine, hemoglobin, crp]}
      value:      {type: float, bounds: [0, 300], precision: 0.01}
public_tables:
  diagnosis_chapters:
    source: diagnosis_chapters.csv
    unique_key: code
    columns:
      code:    {type: category}
      chapter: {type: category}
roles:
  analyst: [query, synth]           # proxies of a private table (FROM hospital.visits, joined with the chapters)
  lf_author: [labeling]             # LF statistics over hospital.visits and its joins (no gold labels)
synthesis: {mode: dp}
labels: {classes: [routine, urgent]}
"""

LAB_TESTS = {"glucose": (95.0, 20.0), "creatinine": (1.0, 0.3), "hemoglobin": (14.0, 1.5), "crp": (8.0, 10.0)}


def generate_hospital(n_patients: int = 20_000, seed: int = 11) -> dict[str, pa.Table]:
    """The hospital's private tables, deterministic for a seed: `patients` (one row per patient), `visits` (Poisson
    many per patient, a diagnosis code and an urgent flag; some patients have more than the policy's bound) and
    `labs` (Poisson many per visit)."""
    rng = np.random.default_rng(seed)
    ids = np.arange(n_patients, dtype=np.int64) + 1_000
    age = np.clip(rng.gamma(4.0, 11.0, n_patients), 0, 105).astype(np.int64)
    sex = np.asarray(SEXES, dtype=object)[rng.choice(len(SEXES), n_patients, p=[0.51, 0.47, 0.02])]
    region = np.asarray(REGIONS, dtype=object)[rng.choice(len(REGIONS), n_patients, p=[0.22, 0.25, 0.18, 0.15, 0.2])]
    income = np.clip(8_000 + 1_100 * age + rng.normal(0, 12_000, n_patients), 0, 480_000).round(2)
    patients = pa.table(
        {
            "patient_id": pa.array(ids, pa.int64()),
            "age": pa.array(age, pa.int64()),
            "sex": pa.array(sex, pa.string()),
            "region": pa.array(region, pa.string()),
            "income": pa.array(income, pa.float64()),
        }
    )
    per_patient = rng.poisson(1.0 + age / 25.0)
    owner = np.repeat(np.arange(n_patients), per_patient)
    n_visits = len(owner)
    urgent = rng.random(n_visits) < np.clip(0.1 + age[owner] / 250.0, 0, 0.6)
    dx = np.where(
        urgent,
        np.asarray(URGENT_DX, dtype=object)[rng.integers(0, len(URGENT_DX), n_visits)],
        np.asarray(ROUTINE_DX, dtype=object)[rng.integers(0, len(ROUTINE_DX), n_visits)],
    )
    visit_ids = np.arange(n_visits, dtype=np.int64) + 1
    visits = pa.table(
        {
            "patient_id": pa.array(ids[owner], pa.int64()),
            "visit_id": pa.array(visit_ids, pa.int64()),
            "diagnosis": pa.array(dx, pa.string()),
            "urgent": pa.array(urgent, pa.bool_()),
            "length_of_stay": pa.array(np.clip(rng.poisson(0.5 + urgent * 4.0), 0, 60), pa.int64()),
        }
    )
    per_visit = rng.poisson(np.where(urgent, 2.5, 0.8))
    of_visit = np.repeat(np.arange(n_visits), per_visit)
    names = list(LAB_TESTS)
    test = rng.integers(0, len(names), len(of_visit))
    means = np.array([LAB_TESTS[n][0] for n in names])[test] * np.where(urgent[of_visit], 1.3, 1.0)
    spread = np.array([LAB_TESTS[n][1] for n in names])[test]
    labs = pa.table(
        {
            "patient_id": pa.array(ids[owner[of_visit]], pa.int64()),
            "visit_id": pa.array(visit_ids[of_visit], pa.int64()),
            "test": pa.array(np.asarray(names, dtype=object)[test], pa.string()),
            "value": pa.array(np.clip(rng.normal(means, spread), 0, 300).round(2), pa.float64()),
        }
    )
    return {"patients": patients, "visits": visits, "labs": labs}


def write_hospital(directory: Path, n_patients: int = 20_000, seed: int = 11) -> tuple[Path, Path]:
    """Write the hospital's tables (Parquet), its public diagnosis chapters (CSV) and its policy; return (the
    patients' data path, the policy path)."""
    directory.mkdir(parents=True, exist_ok=True)
    tables = generate_hospital(n_patients, seed)
    data = directory / "patients.parquet"
    pq.write_table(tables["patients"], data)
    pq.write_table(tables["visits"], directory / "hospital_visits.parquet")
    pq.write_table(tables["labs"], directory / "hospital_labs.parquet")
    pacsv.write_csv(diagnosis_chapters(), directory / "diagnosis_chapters.csv")
    policy = directory / "hospital.yaml"
    policy.write_text(HOSPITAL_POLICY_YAML)
    return data, policy


def next_batch(visits: pa.Table, n_rows: int, seed: int = 29) -> pa.Table:
    """The demo's next batch of visits, new patients only, with two changes a monitor should report: most patients
    now live in the north (region's distribution shifts), and a fifth of the visits carry an income above the
    policy's upper bound 500,000 (the bound breaks). Everything else is drawn as the registered visits were."""
    batch = generate_visits(n_rows, seed)
    rng = np.random.default_rng(seed)
    first_patient = int(pc.max(visits["patient_id"]).as_py()) + 1
    first_visit = int(pc.max(visits["visit_id"]).as_py()) + 7
    patients = batch["patient_id"].to_numpy() - 100_000 + first_patient
    owners = np.unique(patients, return_inverse=True)[1]
    region_p = rng.choice(len(REGIONS), owners.max() + 1, p=[0.55, 0.12, 0.11, 0.1, 0.12])
    income = batch["income"].to_numpy().copy()
    income[rng.random(len(income)) < 0.2] = 650_000.0
    columns = {name: batch[name] for name in batch.column_names}
    columns["patient_id"] = pa.array(patients, pa.int64())
    columns["region"] = pa.array(np.asarray(REGIONS, dtype=object)[region_p[owners]], pa.string())
    columns["income"] = pa.array(income, pa.float64())
    columns["visit_id"] = pa.array(first_visit + np.arange(len(income)) * 7, pa.int64())
    return pa.table(columns).select(visits.column_names)


def write_next_batch(directory: Path, data: Path, n_rows: int) -> Path:
    """Write the demo's next batch (`next_batch`) as `visits-batch-2.parquet` in `directory`; return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "visits-batch-2.parquet"
    pq.write_table(next_batch(pq.read_table(data), n_rows), path)
    return path
