"""The FAIR method: datasets, prompts, answers, stages, scoring, pipeline, report."""
