<#
.SYNOPSIS
  Adds (or updates) a Flotilla entry in the Codex CLI's MCP servers, pointing at `flotilla mcp`.

.DESCRIPTION
  Config file: $env:CODEX_HOME\config.toml, else ~\.codex\config.toml (override with -Config);
  table [mcp_servers.<name>] with command, args and env. Idempotent: an unchanged entry leaves
  the file untouched; otherwise the previous file is kept as <file>.bak-<UTC timestamp>. Other
  tables are preserved verbatim.

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
if (-not $Command) {
  $found = Get-Command flotilla -ErrorAction SilentlyContinue
  if (-not $found) { throw "flotilla is not on PATH; pass -Command C:\path\to\flotilla.exe" }
  $Command = $found.Source
}
$Command = [System.IO.Path]::GetFullPath($Command)
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
$rest = ($kept -join "`n").TrimEnd("`n")
$new = if ($rest) { "$rest`n`n$block" } else { $block }
if ($new -eq $old) {
  Write-Output "${Config}: $Name already up to date"
  exit 0
}
if (Test-Path $Config) {
  $backup = "$Config.bak-" + (Get-Date).ToUniversalTime().ToString("yyyyMMddTHHmmssZ")
  Copy-Item -Path $Config -Destination $backup
  Write-Output "backup: $backup"
}
$dir = Split-Path -Parent $Config
if ($dir -and -not (Test-Path $dir)) { New-Item -ItemType Directory -Path $dir | Out-Null }
[System.IO.File]::WriteAllText($Config, $new, (New-Object System.Text.UTF8Encoding($false)))
Write-Output "${Config}: [mcp_servers.$Name] -> $Command $($cmdArgs -join ' ')"
