"""Several subjects in one run (ShivamShrirao's concepts_list, kohya's subsets): the config's `subjects`.

Each subject has its photos, identifier (None = a rare token picked automatically, distinct from the
others) and class noun. Class images are made per class noun, in one folder shared by that class's
subjects. Batches draw the subjects fairly: row p of the run's instance stream shows subject p mod S,
and its class row is a class image of that subject's class. Everything is a pure function of
(seed, micro_step, rank), so a resumed run draws the same batches (as step.batch_indices).

A config without `subjects` is a one-subject run (instance_dir / identifier / class_noun) and goes
through data.DreamBoothDataset and step.batch_indices exactly as before.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import data
from .class_images import class_image_paths
from .config import TrainConfig
from .errors import InputError

SUBJECT_KEYS = ("name", "instance_dir", "identifier", "class_noun")


@dataclass(frozen=True)
class Subject:
    name: str  # how the log, summary.json, `sample --subject` and `evaluate` call it
    cfg: TrainConfig  # the run's config with this subject's instance_dir, identifier, class_noun, class_dir


def class_folder_name(class_noun: str) -> str:
    return re.sub(r"[^\w-]+", "_", class_noun.strip()) or "class"


def subjects_of(cfg: TrainConfig) -> list[Subject]:
    """The run's subjects, each as a config of its own (one-subject runs: cfg itself). Checks the list
    (model-free): keys, names and identifiers distinct, a class noun for each when prior is on."""
    if cfg.subjects is None:
        return [Subject(Path(cfg.instance_dir).name or "subject", cfg)]
    if not isinstance(cfg.subjects, list) or not cfg.subjects:
        raise InputError(f"subjects = {cfg.subjects!r}: give a non-empty list of {{'instance_dir', 'class_noun', "
                         "'identifier', 'name'}} dicts, or None for one subject (instance_dir, class_noun, identifier)")
    if cfg.instance_dir or cfg.identifier is not None or cfg.class_noun:
        raise InputError("set either subjects or instance_dir / identifier / class_noun, not both: with subjects, "
                         "each subject's dict holds its instance_dir, identifier and class_noun")
    subjects, names, identifiers, folders = [], set(), {}, {}
    for k, entry in enumerate(cfg.subjects):
        if not isinstance(entry, dict) or not entry.get("instance_dir"):
            raise InputError(f"subjects[{k}] = {entry!r}: each subject is a dict with at least 'instance_dir'")
        name = str(entry.get("name") or Path(entry["instance_dir"]).name)
        unknown = sorted(set(entry) - set(SUBJECT_KEYS))
        if unknown:
            raise InputError(f"subject {name!r} has unknown keys {unknown}: use {list(SUBJECT_KEYS)}")
        if name in names:
            raise InputError(f"two subjects are named {name!r}: give each a distinct 'name'")
        names.add(name)
        identifier, noun = entry.get("identifier"), (entry.get("class_noun") or "").strip()
        if identifier is not None:
            if identifier.strip() in identifiers:
                raise InputError(f"subjects {identifiers[identifier.strip()]!r} and {name!r} have the same identifier "
                                 f"{identifier!r}: each subject needs its own (or None to pick distinct ones)")
            identifiers[identifier.strip()] = name
        if cfg.with_prior_preservation and not noun:
            raise InputError(f"subject {name!r} has no class_noun (e.g. 'dog'), which prior preservation needs: "
                             "set it, or turn with_prior_preservation off")
        folder = class_folder_name(noun)
        if folders.setdefault(folder, noun) != noun:
            raise InputError(f"class nouns {folders[folder]!r} and {noun!r} share the class-image folder {folder!r}: "
                             "spell them alike or differently enough")
        class_dir = str(Path(cfg.class_dir) / folder) if cfg.class_dir else None
        subjects.append(Subject(name, dataclasses.replace(cfg, instance_dir=entry["instance_dir"], identifier=identifier,
                                                          class_noun=noun, class_dir=class_dir, subjects=None)))
    return subjects


def default_class_dir(cfg: TrainConfig, class_noun: str) -> Path:
    """Where a class's images go when class_dir is not set: <output_dir>/class_images/<class noun>."""
    return Path(cfg.output_dir) / "class_images" / class_folder_name(class_noun)


def resolve_identifiers(tokenizer, subjects: list[Subject], log=print) -> list[str]:
    """Each subject's identifier: its own, or a rare token none of the others uses (nor any class noun)."""
    taken = {s.cfg.identifier.strip() for s in subjects if s.cfg.identifier is not None}
    taken |= {s.cfg.class_noun for s in subjects}
    out = []
    for s in subjects:
        word = data.resolve_identifier(tokenizer, s.cfg.identifier, log=lambda line, n=s.name: log(f"subject {n!r}: {line}"),
                                       exclude=taken)
        taken.add(word)
        out.append(word)
    return out


@dataclass
class Layout:
    """Which subject each instance value shows, and which class each subject and class value belong to."""
    instance_subject: list[int]  # subject index of each instance value
    subject_class: list[int]  # class index (into class_prompts) of each subject
    class_of_value: list[int]  # class index of each class value (empty without prior preservation)
    class_prompts: list[str]  # one per class


def _permutation(n: int, *key: int) -> torch.Tensor:
    seed = int(np.random.SeedSequence(list(key)).generate_state(1)[0])
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def fair_rows(layout: Layout, batch_size: int, seed: int, micro_step: int, rank: int = 0, world: int = 1,
              with_prior: bool = True) -> list[tuple[int, int | None]]:
    """(instance value, class value or None) of each row of one micro-batch. Row p of the run's stream
    (micro-batches dealt to processes as batch_indices) shows subject s = p mod S, its k = p // S-th draw,
    from per-epoch permutations of that subject's photos; its class row is the next draw of the class
    stream of s's class, which the subjects of that class take in turn. Pure in (seed, micro_step, rank)."""
    n_subjects = len(layout.subject_class)
    photos = [[i for i, s in enumerate(layout.instance_subject) if s == k] for k in range(n_subjects)]
    members = [[s for s, c in enumerate(layout.subject_class) if c == k] for k in range(len(layout.class_prompts))]
    images = [[i for i, c in enumerate(layout.class_of_value) if c == k] for k in range(len(layout.class_prompts))]
    rows = []
    start = (micro_step * world + rank) * batch_size
    for p in range(start, start + batch_size):
        s, k = p % n_subjects, p // n_subjects
        epoch, i = divmod(k, len(photos[s]))
        instance = photos[s][int(_permutation(len(photos[s]), seed, 0, s, epoch)[i])]
        klass = None
        if with_prior:
            c = layout.subject_class[s]
            epoch, i = divmod(k * len(members[c]) + members[c].index(s), len(images[c]))
            klass = images[c][int(_permutation(len(images[c]), seed, 1, c, epoch)[i])]
        rows.append((instance, klass))
    return rows


class SubjectsDataset:
    """Instance values of several subjects and class values of their classes; micro_batch gives the
    examples of one micro-batch (the keys of data.DreamBoothDataset's, for data.collate_examples)."""

    def __init__(self, instance_values, instance_prompts, layout: Layout, class_values=None,
                 instance_sizes=None, class_sizes=None):
        if not (len(instance_values) == len(instance_prompts) == len(layout.instance_subject)) or not instance_values:
            raise ValueError("need one prompt and one subject per instance value")
        if class_values is not None and len(class_values) != len(layout.class_of_value):
            raise ValueError("need one class per class value")
        self.instance_values, self.instance_prompts, self.layout = instance_values, instance_prompts, layout
        self.class_values, self.instance_sizes, self.class_sizes = class_values, instance_sizes, class_sizes

    def __len__(self) -> int:
        return len(self.instance_values) + len(self.class_values or ())

    def micro_batch(self, batch_size: int, seed: int, micro_step: int, rank: int = 0, world: int = 1) -> list[dict]:
        with_prior = self.class_values is not None
        examples = []
        for i, j in fair_rows(self.layout, batch_size, seed, micro_step, rank, world, with_prior):
            example = dict(instance_values=self.instance_values[i], instance_prompt=self.instance_prompts[i])
            if self.instance_sizes is not None:
                example["instance_sizes"] = self.instance_sizes[i]
            if with_prior:
                example["class_values"] = self.class_values[j]
                example["class_prompt"] = self.layout.class_prompts[self.layout.class_of_value[j]]
                if self.class_sizes is not None:
                    example["class_sizes"] = self.class_sizes[j]
            examples.append(example)
        return examples


@dataclass
class SubjectsData:
    """A several-subject run's prompts and pixels (train.py's step 1), ready for prepare_training."""
    records: list[dict]  # per subject: name, identifier, class_noun, instance_dir, instance_prompt, class_prompt
    instance_values: list[torch.Tensor]
    instance_sizes: list[list[int]]
    instance_prompts: list[str]
    class_values: list[torch.Tensor]
    class_sizes: list[list[int]]
    layout: Layout
    num_class_images: int


def prepare_subjects(cfg: TrainConfig, tokenizer, image_gen: torch.Generator, log=print, family=None) -> SubjectsData:
    """Identifiers (distinct; the picked ones logged), prompts, class images per class noun (one folder
    shared by its subjects), then pixels: every subject's photos in order, then every class's images."""
    subjects = subjects_of(cfg)
    identifiers = resolve_identifiers(tokenizer, subjects, log)
    records, photos, prompts, classes = [], [], [], {}
    for s, identifier in zip(subjects, identifiers):
        instance_prompt, class_prompt = data.build_prompts(s.cfg, identifier)
        images = data.load_instance_images(s.cfg.instance_dir, cfg.resolution, cfg.use_captions)
        photos.append(images)
        prompts.append(data.instance_prompts_for(images, s.cfg, identifier))
        classes.setdefault(s.cfg.class_noun, (s.cfg, class_prompt))
        records.append(dict(name=s.name, identifier=identifier, class_noun=s.cfg.class_noun,
                            instance_dir=s.cfg.instance_dir, instance_prompt=instance_prompt, class_prompt=class_prompt,
                            instance_prompts=prompts[-1]))
        log(f"subject {s.name!r}: {len(images)} photos '{instance_prompt}' (identifier '{identifier}')")
    nouns = list(classes)
    class_paths = {}
    if cfg.with_prior_preservation:
        for noun, (class_cfg, class_prompt) in classes.items():
            class_paths[noun] = class_image_paths(class_cfg, class_prompt, log=log, family=family,
                                                  default_dir=default_class_dir(cfg, noun))
    values, sizes, inst_prompts, instance_subject = [], [], [], []
    for k, (images, subject_prompts) in enumerate(zip(photos, prompts)):
        v, z = data.pixels_and_sizes([im.image for im in images], cfg, image_gen)
        values += v
        sizes += z
        inst_prompts += subject_prompts * (2 if cfg.random_flip else 1)  # pixels_and_sizes appends the flips
        instance_subject += [k] * len(v)
    class_values, class_sizes, class_of_value = [], [], []
    for c, noun in enumerate(nouns):
        v, z = data.pixels_and_sizes([Image.open(p).convert("RGB") for p in class_paths.get(noun, [])], cfg, image_gen)
        class_values += v
        class_sizes += z
        class_of_value += [c] * len(v)
    layout = Layout(instance_subject, [nouns.index(s.cfg.class_noun) for s in subjects], class_of_value,
                    [classes[noun][1] for noun in nouns])
    return SubjectsData(records, values, sizes, inst_prompts, class_values, class_sizes, layout,
                        sum(len(p) for p in class_paths.values()))
