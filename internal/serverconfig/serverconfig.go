// Package serverconfig gives a Cairn server binary (distributor, rootkms,
// kms) a config file and environment variables for its flags, without a
// second list of settings that could drift from them: the keys are derived
// from the binary's flag.FlagSet.
//
// # Keys
//
// A flag --state-dir is the file key state_dir and the environment variable
// CAIRN_<BINARY>_STATE_DIR (CAIRN_KMS_STATE_DIR): the flag's name with "-"
// turned into "_", upper-cased for the environment. [Spec.Rename] gives a
// clearer key to a flag whose name is not one (-v: verbose,
// CAIRN_KMS_VERBOSE). --config and --print-config themselves are no keys;
// $CAIRN_<BINARY>_CONFIG is the default of --config.
//
// # File
//
// The file is YAML (one document, a mapping of keys to values); JSON is
// YAML, so a JSON object works too. It is decoded strictly: a key that
// names no flag, a key given twice, an alias, a nested mapping or a value of
// the wrong type is refused, naming the file, the line and the key. Values
// are typed as the flag is: booleans (true/false), integers, durations as
// strings ("30s"), strings; a comma-separated list flag
// ([Spec.Lists]) takes a string, as on the command line, or a sequence of
// strings. Relative paths mean what they mean on the command line:
// relative to the working directory.
//
// YAML, because operators write these files by hand and keep them in
// configuration management: comments say why a value is what it is. The
// file is read with go.yaml.in/yaml/v3 as a node tree, not converted to
// JSON first (sigs.k8s.io/yaml): its YAML 1.2 scalars keep mlock: off a
// string, where YAML 1.1 would make it false, and every error keeps the
// line it is about.
//
// # Precedence
//
// Flags on the command line win over the environment, which wins over the
// file, which wins over the flags' defaults. Every value, whatever its
// source, is checked the same way ([Spec.Checks], and no negative number or
// duration), and an error names the setting the way it was given: --listen,
// CAIRN_KMS_LISTEN, or "kms config FILE:LINE: listen".
//
// # Printing
//
// [Config.Print] writes the effective config as a file the binary accepts,
// each line commented with where the value came from. Secrets are never
// printed: see [Spec.Secret].
package serverconfig

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// Spec says how one binary's flags map to its config file and environment.
type Spec struct {
	// Binary names the binary: "kms" gives CAIRN_KMS_* variables and errors
	// such as "kms config FILE:3: listen: ...".
	Binary string
	// Rename maps a flag name to its key where the derived key would be
	// unclear ("v" → "verbose").
	Rename map[string]string
	// Lists are the comma-separated flags: in a file they also take a
	// sequence of strings.
	Lists []string
	// Secrets are flags whose values are secrets (a PIN, a passphrase, a
	// token), on top of those [Spec.Secret] recognises by name.
	Secrets []string
	// Checks validate a flag's effective value, whatever its source. A
	// check's error completes the sentence `SETTING: "VALUE" ...`, such as
	// "is not a host:port (port 99999 is out of range)": the caller names
	// the setting and quotes the value.
	Checks map[string]Check
}

// Check validates a setting's value (as a flag would take it).
type Check func(value string) error

// configFlag and printFlag are the flags Register adds; they are no keys.
const (
	configFlag = "config"
	printFlag  = "print-config"
)

// secretWords mark a key as a secret (see Spec.Secret).
var secretWords = []string{"pin", "passphrase", "password", "token", "secret"}

// Key returns the config file key of the flag name.
func (s Spec) Key(name string) string {
	if k, ok := s.Rename[name]; ok {
		return k
	}
	return strings.ReplaceAll(name, "-", "_")
}

// EnvPrefix is the prefix of every environment variable of the binary.
func (s Spec) EnvPrefix() string { return "CAIRN_" + strings.ToUpper(s.Binary) + "_" }

// Env returns the environment variable of the flag name.
func (s Spec) Env(name string) string { return s.EnvPrefix() + strings.ToUpper(s.Key(name)) }

// ConfigEnv is the environment variable holding the default --config.
func (s Spec) ConfigEnv() string { return s.EnvPrefix() + "CONFIG" }

// Secret reports whether the flag name holds a secret, which --print-config
// never prints: it is in Secrets, or a word of its key is pin, passphrase,
// password, token or secret and the key does not end in _file or _env (a
// file or variable holding the secret is not the secret).
func (s Spec) Secret(name string) bool {
	if slices.Contains(s.Secrets, name) {
		return true
	}
	words := strings.Split(s.Key(name), "_")
	if last := words[len(words)-1]; len(words) > 1 && (last == "file" || last == "env") {
		return false
	}
	for _, w := range words {
		if slices.Contains(secretWords, w) {
			return true
		}
	}
	return false
}

// Validate checks the spec against the binary's flags: every name in it is
// a flag, and no two flags share a key. The binaries' tests call it; Load
// does too, so a mismatch cannot ship silently.
func (s Spec) Validate(fs *flag.FlagSet) error {
	if s.Binary == "" || strings.ToLower(s.Binary) != s.Binary || strings.ContainsAny(s.Binary, "-_ ") {
		return fmt.Errorf("serverconfig: binary %q: want a lower-case name", s.Binary)
	}
	var errs []error
	known := func(what, name string) {
		if name == configFlag || name == printFlag || fs.Lookup(name) == nil {
			errs = append(errs, fmt.Errorf("serverconfig: %s names %q, which is no flag of %s", what, name, s.Binary))
		}
	}
	for name := range s.Rename {
		known("Rename", name)
	}
	for _, name := range s.Lists {
		known("Lists", name)
	}
	for _, name := range s.Secrets {
		known("Secrets", name)
	}
	for name := range s.Checks {
		known("Checks", name)
	}
	keys := map[string]string{}
	fs.VisitAll(func(f *flag.Flag) {
		if f.Name == configFlag || f.Name == printFlag {
			return
		}
		k := s.Key(f.Name)
		if other, dup := keys[k]; dup {
			errs = append(errs, fmt.Errorf("serverconfig: flags --%s and --%s both have key %q", other, f.Name, k))
		}
		if k == "config" || k == "print_config" || k == "" {
			errs = append(errs, fmt.Errorf("serverconfig: flag --%s has key %q, which is reserved", f.Name, k))
		}
		keys[k] = f.Name
	})
	return errors.Join(errs...)
}

// Flags are --config and --print-config.
type Flags struct {
	spec Spec
	// File is the config file (--config; default $CAIRN_<BINARY>_CONFIG).
	File string
	// Print asks the binary to print the effective config and exit.
	Print bool
}

// Register adds --config and --print-config to fs.
func Register(fs *flag.FlagSet, spec Spec) *Flags {
	f := &Flags{spec: spec}
	fs.StringVar(&f.File, configFlag, "", fmt.Sprintf("YAML (or JSON) `file` of settings: each flag's name with _ for -; flags win over $%s* variables, which win over the file (default $%s)", spec.EnvPrefix(), spec.ConfigEnv()))
	fs.BoolVar(&f.Print, printFlag, false, "print the effective settings (file, environment and flags; secrets redacted) and exit")
	return f
}

// ErrPrinted is Parse's error for a bad command line the flag package has
// already reported (the binary exits 2 without a word more).
var ErrPrinted = errors.New("serverconfig: bad command line (reported)")

// Parse parses args into fs (no positional arguments are taken), then
// applies the config file and env under them (Load). It returns (nil, nil)
// for -h, once the help is printed, and ErrPrinted for a bad flag the flag
// package has reported.
func (f *Flags) Parse(fs *flag.FlagSet, args, env []string) (*Config, error) {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil, nil
		}
		return nil, ErrPrinted
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("%s: unexpected arguments %v", f.spec.Binary, fs.Args())
	}
	return f.Load(fs, env)
}

// Keys returns the config keys of fs's flags, sorted, and those of them
// that are secrets (what --print-config redacts), for a binary's test to
// pin. It fails if the spec does not fit fs (Validate), or if a flag whose
// usage says "comma-separated" is not in Lists or the other way round.
func (s Spec) Keys(fs *flag.FlagSet) (keys, secrets []string, err error) {
	if err := s.Validate(fs); err != nil {
		return nil, nil, err
	}
	var errs []error
	fs.VisitAll(func(f *flag.Flag) {
		if f.Name == configFlag || f.Name == printFlag {
			return
		}
		keys = append(keys, s.Key(f.Name))
		if s.Secret(f.Name) {
			secrets = append(secrets, s.Key(f.Name))
		}
		if list := strings.Contains(f.Usage, "comma-separated"); list != slices.Contains(s.Lists, f.Name) {
			errs = append(errs, fmt.Errorf("--%s: a comma-separated flag is in Lists, and only such a flag (usage %q)", f.Name, f.Usage))
		}
	})
	slices.Sort(keys)
	slices.Sort(secrets)
	return keys, secrets, errors.Join(errs...)
}

// Origin is where a setting's effective value came from.
type Origin int

const (
	FromDefault Origin = iota
	FromFile
	FromEnv
	FromFlag
)

// Config is a binary's effective settings: the flags of fs with the file and
// environment applied.
type Config struct {
	spec    Spec
	fs      *flag.FlagSet
	file    string
	origin  map[string]Origin // flag name → origin
	line    map[string]int    // flag name → line in the file
	secrets map[string]bool
}

// Load applies the config file and the environment (env, as os.Environ
// returns it) to fs, already parsed from the command line: each flag not
// given on the command line takes its environment variable if set, else its
// file key if present. It then checks every effective value. Nothing else
// reads the environment.
func (f *Flags) Load(fs *flag.FlagSet, env []string) (*Config, error) {
	s := f.spec
	if err := s.Validate(fs); err != nil {
		return nil, err
	}
	c := &Config{spec: s, fs: fs, origin: map[string]Origin{}, line: map[string]int{}, secrets: map[string]bool{}}
	fs.Visit(func(fl *flag.Flag) { c.origin[fl.Name] = FromFlag })
	vars, err := c.environment(env)
	if err != nil {
		return nil, err
	}
	c.file = f.File
	if c.origin[configFlag] != FromFlag {
		if v, ok := vars[s.ConfigEnv()]; ok {
			c.file = v
		}
	}
	if c.file != "" {
		if err := c.applyFile(); err != nil {
			return nil, err
		}
	}
	if err := c.applyEnv(vars); err != nil {
		return nil, err
	}
	if err := c.check(); err != nil {
		return nil, err
	}
	return c, nil
}

// environment returns the binary's variables of env, refusing one that
// names no setting (a typo would otherwise be ignored).
func (c *Config) environment(env []string) (map[string]string, error) {
	byEnv := map[string]string{c.spec.ConfigEnv(): configFlag}
	c.eachSetting(func(fl *flag.Flag) { byEnv[c.spec.Env(fl.Name)] = fl.Name })
	vars := map[string]string{}
	for _, kv := range env {
		k, v, _ := strings.Cut(kv, "=")
		if !strings.HasPrefix(k, c.spec.EnvPrefix()) {
			continue
		}
		if _, ok := byEnv[k]; !ok {
			known := make([]string, 0, len(byEnv))
			for e := range byEnv {
				known = append(known, e)
			}
			return nil, fmt.Errorf("%s: unknown environment variable %s%s", c.spec.Binary, k, suggest(k, known))
		}
		vars[k] = v
	}
	return vars, nil
}

// eachSetting calls fn for every flag that is a setting, in name order.
func (c *Config) eachSetting(fn func(*flag.Flag)) {
	c.fs.VisitAll(func(fl *flag.Flag) {
		if fl.Name != configFlag && fl.Name != printFlag {
			fn(fl)
		}
	})
}

func (c *Config) applyEnv(vars map[string]string) error {
	var err error
	c.eachSetting(func(fl *flag.Flag) {
		v, ok := vars[c.spec.Env(fl.Name)]
		if !ok || err != nil || c.origin[fl.Name] == FromFlag {
			return
		}
		if e := set(fl, v); e != nil {
			err = fmt.Errorf("%s: %s: %q %v", c.spec.Binary, c.spec.Env(fl.Name), v, e)
			return
		}
		c.origin[fl.Name] = FromEnv
	})
	return err
}

func (c *Config) fileErr(line int, format string, args ...any) error {
	return fmt.Errorf("%s config %s:%d: %s", c.spec.Binary, c.file, line, fmt.Sprintf(format, args...))
}

// applyFile decodes the file strictly and sets every flag it names that the
// command line does not.
func (c *Config) applyFile() error {
	data, err := os.ReadFile(c.file)
	if err != nil {
		return fmt.Errorf("%s: --config: %w", c.spec.Binary, err)
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	switch err := dec.Decode(&doc); {
	case errors.Is(err, io.EOF):
		return nil // an empty file sets nothing
	case err != nil:
		return fmt.Errorf("%s config %s: %v", c.spec.Binary, c.file, err)
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		return fmt.Errorf("%s config %s: want one YAML document, found more", c.spec.Binary, c.file)
	}
	root := &doc
	if root.Kind == yaml.DocumentNode && len(root.Content) == 1 {
		root = root.Content[0]
	}
	if root.Kind == yaml.ScalarNode && root.ShortTag() == "!!null" {
		return nil // only comments
	}
	if root.Kind != yaml.MappingNode {
		return c.fileErr(root.Line, "want a mapping of settings (key: value)")
	}
	byKey := map[string]*flag.Flag{}
	var keys []string
	c.eachSetting(func(fl *flag.Flag) {
		byKey[c.spec.Key(fl.Name)] = fl
		keys = append(keys, c.spec.Key(fl.Name))
	})
	seen := map[string]int{}
	for i := 0; i+1 < len(root.Content); i += 2 {
		kn, vn := root.Content[i], root.Content[i+1]
		if kn.Kind != yaml.ScalarNode || kn.ShortTag() != "!!str" {
			return c.fileErr(kn.Line, "a key must be a plain string")
		}
		key := kn.Value
		fl, ok := byKey[key]
		if !ok {
			return c.fileErr(kn.Line, "unknown key %q%s", key, suggest(key, keys))
		}
		if first, dup := seen[key]; dup {
			return c.fileErr(kn.Line, "%s: given twice (first on line %d)", key, first)
		}
		seen[key] = kn.Line
		v, err := c.scalar(fl, vn)
		if err != nil {
			return c.fileErr(vn.Line, "%s: %v", key, err)
		}
		if c.origin[fl.Name] == FromFlag {
			continue // the command line wins; the value was still checked
		}
		if err := set(fl, v); err != nil {
			return c.fileErr(vn.Line, "%s: %q %v", key, v, err)
		}
		c.origin[fl.Name] = FromFile
		c.line[fl.Name] = vn.Line
	}
	return nil
}

// kind is how a flag's value is typed.
type kind int

const (
	kindString kind = iota
	kindBool
	kindInt
	kindDuration
)

func kindOf(fl *flag.Flag) kind {
	if b, ok := fl.Value.(interface{ IsBoolFlag() bool }); ok && b.IsBoolFlag() {
		return kindBool
	}
	g, ok := fl.Value.(flag.Getter)
	if !ok {
		return kindString
	}
	switch g.Get().(type) {
	case time.Duration:
		return kindDuration
	case int, int64, uint, uint64:
		return kindInt
	}
	return kindString
}

// scalar returns the flag spelling of a file value, refusing a value of
// the wrong YAML type.
func (c *Config) scalar(fl *flag.Flag, n *yaml.Node) (string, error) {
	if n.Kind == yaml.AliasNode || n.Anchor != "" {
		return "", errors.New("anchors and aliases are not supported")
	}
	if n.Kind == yaml.SequenceNode {
		if !slices.Contains(c.spec.Lists, fl.Name) {
			return "", errors.New("want a single value, not a list")
		}
		items := make([]string, 0, len(n.Content))
		for _, it := range n.Content {
			if it.Kind != yaml.ScalarNode || it.ShortTag() != "!!str" || it.Value == "" || strings.Contains(it.Value, ",") {
				return "", fmt.Errorf("line %d: want each item a non-empty string without commas", it.Line)
			}
			items = append(items, it.Value)
		}
		return strings.Join(items, ","), nil
	}
	if n.Kind != yaml.ScalarNode {
		return "", errors.New("want a value, not a mapping")
	}
	tag := n.ShortTag()
	if tag == "!!null" {
		return "", errors.New(`no value (write "" for an empty one)`)
	}
	switch kindOf(fl) {
	case kindBool:
		if tag != "!!bool" {
			return "", fmt.Errorf("%q: want true or false", n.Value)
		}
	case kindInt:
		if tag != "!!int" {
			return "", fmt.Errorf("%q: want an integer", n.Value)
		}
	case kindDuration:
		if tag != "!!str" {
			return "", fmt.Errorf("%s: want a duration with its unit, such as \"30s\" or \"10m\"", n.Value)
		}
	default:
		if tag != "!!str" {
			return "", fmt.Errorf("%s: want a string (quote it)", n.Value)
		}
	}
	return n.Value, nil
}

// set sets fl to v, with an error that says what v should be.
func set(fl *flag.Flag, v string) error {
	err := fl.Value.Set(v)
	if err == nil {
		return nil
	}
	switch kindOf(fl) {
	case kindBool:
		return errors.New("is not true or false")
	case kindInt:
		return errors.New("is not an integer")
	case kindDuration:
		return errors.New(`is not a duration such as "30s" or "10m"`)
	}
	return fmt.Errorf("is refused: %v", err)
}

// check validates every effective value.
func (c *Config) check() error {
	var errs []error
	c.eachSetting(func(fl *flag.Flag) {
		v := fl.Value.String()
		var err error
		switch g, _ := fl.Value.(flag.Getter); kindOf(fl) {
		case kindInt:
			if n, ok := g.Get().(int); ok && n < 0 {
				err = errors.New("must not be negative")
			}
			if n, ok := g.Get().(int64); ok && n < 0 {
				err = errors.New("must not be negative")
			}
		case kindDuration:
			if d := g.Get().(time.Duration); d < 0 {
				err = errors.New("must not be negative")
			}
		}
		if chk := c.spec.Checks[fl.Name]; err == nil && chk != nil {
			err = chk(v)
		}
		if err != nil {
			errs = append(errs, c.Errorf(fl.Name, "%q %v", v, err))
		}
	})
	return errors.Join(errs...)
}

// File is the config file applied ("" if none).
func (c *Config) File() string { return c.file }

// Origin returns where the flag name's value came from.
func (c *Config) Origin(name string) Origin { return c.origin[name] }

// IsSet reports whether the flag name was given anywhere (not a default).
func (c *Config) IsSet(name string) bool { return c.origin[name] != FromDefault }

// Name names the flag name's setting the way it was given: --listen,
// CAIRN_KMS_LISTEN, or "listen (FILE:LINE)"; a default is named as its
// flag.
func (c *Config) Name(name string) string {
	switch c.origin[name] {
	case FromEnv:
		return c.spec.Env(name)
	case FromFile:
		return fmt.Sprintf("%s (%s:%d)", c.spec.Key(name), c.file, c.line[name])
	}
	return "--" + name
}

// Errorf returns an error about the flag name's setting, prefixed with the
// binary and the setting as it was given: "kms: --listen: ...",
// "kms: CAIRN_KMS_LISTEN: ..." or "kms config FILE:LINE: listen: ...".
func (c *Config) Errorf(name, format string, args ...any) error {
	msg := fmt.Sprintf(format, args...)
	if c.origin[name] == FromFile {
		return fmt.Errorf("%s config %s:%d: %s: %s", c.spec.Binary, c.file, c.line[name], c.spec.Key(name), msg)
	}
	return fmt.Errorf("%s: %s: %s", c.spec.Binary, c.Name(name), msg)
}

// Redacted is what Print writes instead of a secret's value.
const Redacted = "<redacted>"

// Print writes the effective config as a YAML file the binary accepts,
// keys sorted, each value commented with its origin. A secret (see
// Spec.Secret) that is set is written as a comment naming its origin, never
// its value, so the output fed back as --config leaves it unset.
func (c *Config) Print(w io.Writer) error {
	var b strings.Builder
	fmt.Fprintf(&b, "# %s: effective settings; flags > environment (%s*) > ", c.spec.Binary, c.spec.EnvPrefix())
	if c.file != "" {
		fmt.Fprintf(&b, "config file %s", c.file)
	} else {
		b.WriteString("config file (none)")
	}
	b.WriteString(" > defaults\n")
	type line struct{ key, text string }
	var lines []line
	c.eachSetting(func(fl *flag.Flag) {
		key := c.spec.Key(fl.Name)
		from := c.from(fl.Name)
		v := fl.Value.String()
		if c.spec.Secret(fl.Name) && v != "" {
			lines = append(lines, line{key, fmt.Sprintf("# %s: %s  # %s", key, Redacted, from)})
			return
		}
		lines = append(lines, line{key, fmt.Sprintf("%s: %s  # %s", key, c.yamlValue(fl, v), from)})
	})
	slices.SortFunc(lines, func(a, b line) int { return strings.Compare(a.key, b.key) })
	for _, l := range lines {
		b.WriteString(l.text + "\n")
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func (c *Config) from(name string) string {
	switch c.origin[name] {
	case FromFlag:
		return "--" + name
	case FromEnv:
		return c.spec.Env(name)
	case FromFile:
		return fmt.Sprintf("file, line %d", c.line[name])
	}
	return "default"
}

// yamlValue writes v typed as the flag is: JSON scalars and arrays are YAML.
func (c *Config) yamlValue(fl *flag.Flag, v string) string {
	switch kindOf(fl) {
	case kindBool, kindInt:
		return v
	}
	if slices.Contains(c.spec.Lists, fl.Name) {
		items := []string{}
		for _, it := range strings.Split(v, ",") {
			if it = strings.TrimSpace(it); it != "" {
				items = append(items, it)
			}
		}
		out, _ := json.Marshal(items)
		return string(out)
	}
	out, _ := json.Marshal(v)
	return string(out)
}

// suggest returns ` (did you mean "x"?)` for the closest of known within
// two edits of s, else "".
func suggest(s string, known []string) string {
	best, bestD := "", 3
	for _, k := range known {
		if d := editDistance(strings.ToLower(s), strings.ToLower(k)); d < bestD || (d == bestD && k < best) {
			best, bestD = k, d
		}
	}
	if best == "" {
		return ""
	}
	return fmt.Sprintf(" (did you mean %q?)", best)
}

// editDistance is the Levenshtein distance between a and b.
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}
