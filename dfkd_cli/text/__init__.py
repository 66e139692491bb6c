"""Text teachers: Hugging Face sequence classifiers distilled on synthetic text.

The same data flow as for images, with text in place of pixels: ``models`` loads the teacher,
student and language models from local folders; ``synth`` and ``prompter`` make texts;
``trainer`` distils the student; ``export`` writes it; ``pipeline`` runs the whole compression.
"""

# The text synthesizers register in dfkd_cli.synth's registry, which imports them: importing that
# package first keeps the cycle in one order, whichever of the two a program imports first.
import dfkd_cli.synth  # noqa: F401,E402
