"""Stage 0, the student: a Hugging Face model directory described as a StudentModel, or the built-in demo."""

from edgepack.student.demo import resolve_model
from edgepack.student.load import load_student

__all__ = ["load_student", "resolve_model"]
