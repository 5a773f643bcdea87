"""Visual codebook (issue 17): patch codes of the real images and their alignment with report words."""

from diffmask.codebook.alignment import WordCodePMI, report_words
from diffmask.codebook.codebook import CODEBOOK_FILE, VisualCodebook, codebook_usage, kmeans

__all__ = ["CODEBOOK_FILE", "VisualCodebook", "WordCodePMI", "codebook_usage", "kmeans", "report_words"]
