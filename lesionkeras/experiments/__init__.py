"""The papers' experiment tables (noise table, clean-size curve, missing-label table) and their commands."""
