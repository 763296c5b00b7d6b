package cpu

// Expf exposes expf to the tests.
var Expf = expf
