// Intentionally empty: omnimoe_torch is the static omnimoe_lib, whole, as a shared library.
