"""helpers package: what the tests share (servers, clusters, catalogues of files, stand-ins); test modules import these, never each other."""
