"""The embedded default: a procedurally generated visual QA task and the draft/target pair trained on it."""
