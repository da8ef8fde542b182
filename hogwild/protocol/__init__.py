"""The collaboration protocol: prompts, step boundaries, answers, layouts and the finisher."""
