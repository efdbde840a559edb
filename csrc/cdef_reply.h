/* What cffi sees of reply.h (contracts are there): only the function that
 * sets Reply on the module (ch_reply_new is for decode.c). */
int ch_reply_register(const char *module);
