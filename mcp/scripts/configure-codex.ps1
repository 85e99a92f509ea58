<#
.SYNOPSIS
  Adds (or updates) a Flotilla entry in the Codex CLI's MCP servers, pointing at `flotilla mcp`.

.DESCRIPTION
  Config file: $env:CODEX_HOME\config.toml, else ~\.codex\config.toml (override with -Config);
  table [mcp_servers.<name>] with command, args and env. Idempotent: an unchanged entry leaves
  the file untouched; otherwise the previous file is kept as <file>.bak-<UTC time to
  the microsecond>. Other
  tables are preserved verbatim. An entry written as dotted keys or an inline table (not a
  [mcp_servers.<name>] table) is refused rather than duplicated. The result is validated with
  Python's tomllib when a Python >= 3.11 is found; without one only those structural checks
  run (the entry itself is generated, the rest of the file is kept byte for byte).

.EXAMPLE
  .\configure-codex.ps1 -Server http://127.0.0.1:8080 -TokenFile $HOME\.flotilla\token
#>
param(
  [string]$Server = "http://127.0.0.1:8080",
  [string]$TokenFile = "",
  [switch]$ReadOnly,
  [string]$Name = "flotilla",
  [string]$Command = "",
  [string]$Config = ""
)
$ErrorActionPreference = "Stop"

if ($Server -notmatch '^https?://') { throw "-Server must be an http:// or https:// URL, got $Server" }
if ($Name -notmatch '^[A-Za-z0-9_-]+$') { throw "-Name must be letters, digits, _ or -" }
# Without a token the entry could only ever answer "unauthorized": refuse to write it.
if (-not $TokenFile) { throw "-TokenFile is required: the file holding a Flotilla API token (a local server writes data\admin.token; see api.tokens_file). Without one every tool call fails as unauthorized" }
if (-not $Command) {
  $found = Get-Command flotilla -ErrorAction SilentlyContinue
  if (-not $found) { throw "flotilla is not on PATH: install it with ``cargo install --locked --path server`` from the repository (into ~\.cargo\bin), or pass -Command C:\path\to\flotilla.exe" }
  $Command = $found.Source
}
$Command = [System.IO.Path]::GetFullPath($Command)
if (-not (Test-Path -LiteralPath $Command -PathType Leaf)) { throw "-Command $Command is not a file" }
if ($TokenFile) {
  $TokenFile = [System.IO.Path]::GetFullPath($TokenFile)
  if (-not (Test-Path $TokenFile)) { Write-Warning "$TokenFile does not exist (yet)" }
}
if (-not $Config) {
  $codexHome = if ($env:CODEX_HOME) { $env:CODEX_HOME } else { Join-Path $HOME ".codex" }
  $Config = Join-Path $codexHome "config.toml"
}

# A TOML basic string: backslashes and quotes escaped (Windows paths are full of backslashes).
function Quote([string]$s) { '"' + ($s -replace '\\', '\\' -replace '"', '\"') + '"' }

$cmdArgs = @("mcp", "--server", $Server)
if ($TokenFile) { $cmdArgs += @("--token-file", $TokenFile) }
if ($ReadOnly) { $cmdArgs += "--read-only" }
$block = "[mcp_servers.$Name]`n" +
  "command = $(Quote $Command)`n" +
  "args = [$((($cmdArgs | ForEach-Object { Quote $_ }) -join ', '))]`n" +
  "env = { FLOTILLA_LOG = `"warn`" }`n"

$old = ""
if (Test-Path $Config) { $old = (Get-Content -Raw -Path $Config) -replace "`r`n", "`n" }
if ($null -eq $old) { $old = "" }
# Drop our previous table (and its sub-tables) up to the next unrelated header.
$kept = New-Object System.Collections.Generic.List[string]
$skipping = $false
foreach ($line in ($old -split "`n")) {
  if ($line -match '^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$') {
    $t = $Matches[1] -replace ' ', ''
    $skipping = ($t -eq "mcp_servers.$Name") -or ($t -eq "mcp_servers.`"$Name`"") -or $t.StartsWith("mcp_servers.$Name.")
  }
  if (-not $skipping) { $kept.Add($line) }
}
# Definitions of our entry the table removal above cannot see: dotted keys
# (mcp_servers.<name>.command = ..., or <name>.command = ... inside [mcp_servers]) and inline
# tables (mcp_servers = { ... }, <name> = { ... }). Rewriting those by text is how duplicate
# keys happen: refuse and let the operator decide (as configure-codex.sh does).
$q = [regex]::Escape($Name)
$nameRe = "(?:$q|`"$q`"|'$q')"
$table = ""
foreach ($line in $kept) {
  if ($line -match '^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$') { $table = $Matches[1] -replace ' ', ''; continue }
  $other = (($table -eq "") -and ($line -match "^\s*mcp_servers\s*\.\s*$nameRe\s*[.=]")) -or
    (($table -eq "") -and ($line -match '^\s*mcp_servers\s*=')) -or
    (($table -eq "mcp_servers") -and ($line -match "^\s*$nameRe\s*[.=]"))
  if ($other) {
    throw "$Config defines mcp_servers.$Name (or mcp_servers) with dotted keys or an inline table; this script replaces only a [mcp_servers.$Name] table. Remove that definition (or rewrite it as such a table) and run again."
  }
}
$rest = ($kept -join "`n").TrimEnd("`n")
$new = if ($rest) { "$rest`n`n$block" } else { $block }
# Validate with tomllib where a Python >= 3.11 exists: exit 0 valid, 1 invalid (traceback),
# anything else (no tomllib, the Store's python stub) means no validator.
$check = "import sys`ntry:`n import tomllib`nexcept ImportError:`n sys.exit(3)`ntomllib.loads(sys.stdin.read())"
$py = @("py", "python3", "python") | ForEach-Object { Get-Command $_ -ErrorAction SilentlyContinue } | Select-Object -First 1
if ($py) {
  $new | & $py.Source -c $check 2>$null | Out-Null
  if ($LASTEXITCODE -eq 1) { throw "refusing to write ${Config}: the result would not be valid TOML" }
}
if ($new -eq $old) {
  Write-Output "${Config}: $Name already up to date"
  exit 0
}
if (Test-Path $Config) {
  # Microseconds, and a counter on a clash: two runs in one second keep two backups.
  $stamp = (Get-Date).ToUniversalTime().ToString("yyyyMMddTHHmmss.ffffffZ")
  $backup = "$Config.bak-$stamp"
  $n = 1
  while (Test-Path -LiteralPath $backup) { $backup = "$Config.bak-$stamp-$n"; $n++ }
  Copy-Item -LiteralPath $Config -Destination $backup
  Write-Output "backup: $backup"
}
$dir = Split-Path -Parent $Config
if ($dir -and -not (Test-Path $dir)) { New-Item -ItemType Directory -Path $dir | Out-Null }
[System.IO.File]::WriteAllText($Config, $new, (New-Object System.Text.UTF8Encoding($false)))
Write-Output "${Config}: [mcp_servers.$Name] -> $Command $($cmdArgs -join ' ')"
