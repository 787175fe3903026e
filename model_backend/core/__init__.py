"""Bottom layer: configuration, errors, atomic writes, folders, process groups. No torch at import, no
import from any other layer."""
