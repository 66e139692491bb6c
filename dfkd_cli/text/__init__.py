"""Text teachers: Hugging Face sequence classifiers distilled on synthetic text.

The same data flow as for images, with text in place of pixels: ``models`` loads the teacher,
student and language models from local folders; ``synth`` and ``prompter`` make texts;
``trainer`` distils the student; ``export`` writes it; ``pipeline`` runs the whole compression.
"""
