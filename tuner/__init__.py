"""tuner: turn a company's conversation logs into a chatbot that answers in its voice."""

__version__ = "0.1.0"
