"""epure: MMVAE+ for tire cross-section design.

    epure train --max-steps 20        # the small preset on the built-in synthetic designs
"""

__version__ = "0.1.0"
