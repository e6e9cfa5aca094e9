"""helpers package: what the tests share (servers, clusters, catalogues of files, stand-ins, job settings);
test modules import these, never each other."""
