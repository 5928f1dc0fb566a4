from modelalloy._entry import entry

entry()
