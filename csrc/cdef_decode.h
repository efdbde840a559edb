/* What cffi sees of decode.h (contracts are there): only the function that
 * sets decode_messages, take_reply and reply_rid on the module. */
int ch_decode_register(const char *module);
