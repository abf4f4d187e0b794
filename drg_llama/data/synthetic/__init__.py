"""Grouper-labelled synthetic discharge summaries in MIMIC-IV's exact file layout.

MIMIC-IV cannot be shipped, so the toolkit writes a stand-in corpus on which every code path (loader, section
extraction, title mapping, training, evaluation) runs without credentials::

    python -m drg_llama.data synth --out data/synth --n 20000 --seed 0
    python -c "from drg_llama.data.synthetic import synthesize; print(synthesize('/tmp/synth', 2000))"

Files written under ``out_root`` (gzip, ``mtime=0``, so the same seed gives the same bytes):

* ``note/discharge.csv.gz``: note_id, subject_id, hadm_id, note_type, note_seq, charttime, storetime, text
* ``hosp/drgcodes.csv.gz``: subject_id, hadm_id, drg_type, drg_code, description, drg_severity, drg_mortality
* ``hosp/diagnoses_icd.csv.gz``: subject_id, hadm_id, seq_num, icd_code, icd_version
* ``hosp/procedures_icd.csv.gz``: subject_id, hadm_id, seq_num, chartdate, icd_code, icd_version
* ``hosp/patients.csv.gz``: subject_id, gender, anchor_age, anchor_year, anchor_year_group, dod
* ``hosp/admissions.csv.gz``: MIMIC-IV's 16 columns (admittime, dischtime, discharge_location, hospital_expire_flag,
  ...; those no step reads are left empty)

How a stay is made, one module each:

1. **Codes first** (``sampling``): a principal diagnosis from a curated list of common inpatient problems or from a
   long tail of every valid principal code (``codes``), secondary diagnoses for a target severity from the CMS
   CC/MCC lists, chronic conditions, procedures; age, sex and discharge status per patient/stay.
2. **Label from the grouper** (``corpus``): the claim goes through the msdrg grouper for the requested version; its
   ``final_drg`` is the HCFA row. The text never decides a label.
3. **Text from the codes** (``render``): the note is written from the coded facts, in words from the vocabulary
   (``vocabulary/*.yaml``, package data read by ``vocabulary``); conditions that are NOT coded appear only negated or
   as past history, and no ICD code, DRG number or DRG title is written.
"""

from drg_llama.data.synthetic.corpus import synthesize

__all__ = ["synthesize"]
