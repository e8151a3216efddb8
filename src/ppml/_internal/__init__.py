"""Private helpers shared by every layer: files, time, canonical encodings. Not public API."""
