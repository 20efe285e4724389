"""Serving many streams: the pool of their states and the batcher that feeds it frames."""
