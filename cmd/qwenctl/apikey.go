package main

import (
	"fmt"
	"os"

	"github.com/qwenfleet/qwenfleet/pkg/security"
)

// runAPIKey adds an API key to a keys file and prints the key, once, on
// stdout (only its hash is kept).
func runAPIKey(args []string) error {
	fs := newFlags("apikey", "--file FILE --name N --role user|admin")
	file := fs.String("file", "", "API keys file (JSON lines of sha256, name, role; created 0600)")
	name := fs.String("name", "", "name of the key (unique in the file)")
	role := fs.String("role", "", "user or admin")
	if err := parse(fs, args); err != nil {
		return err
	}
	switch {
	case *file == "":
		return usagef("--file: a keys file is required")
	case *name == "":
		return usagef("--name: a name is required")
	case *role != security.APIRoleUser && *role != security.APIRoleAdmin:
		return usagef("--role: %q is not user or admin", *role)
	}
	key, err := security.AddAPIKey(*file, *name, *role)
	if err != nil {
		return err
	}
	fmt.Fprintln(os.Stdout, key)
	return nil
}
