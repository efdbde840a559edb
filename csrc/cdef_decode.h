/* What cffi sees of decode.h (contracts are there): only the function that
 * sets decode_messages and take_reply on the module. */
int ch_decode_register(const char *module);
