"""streamgen subpackage."""
