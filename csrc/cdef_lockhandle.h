/* What cffi sees of lockhandle.h (contracts are there): only the function
 * that creates LockBase and sets it on the module; the type itself reaches
 * Python as that module attribute. */
#define CH_LOCK_FOREVER_S ...
int ch_lockbase_register(const char *module);
