"""Machine unlearning: sharded exact unlearning (APA, SISA, RecEraser-style) and approximate unlearning."""
